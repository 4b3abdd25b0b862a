"""IP-Adapter+ (and the plain IP-Adapter SDXL layout) on SDXL (engine/sdxl.py) against diffusers' StableDiffusionXLPipeline + load_ip_adapter on tiny random
SDXL weights (two text encoders, `text_time` added conditioning, the adapter in the two-key layout): latents
within 1e-4 and PNGs within one grey level, for two schedulers, size conditioning and a per-block scale dict; scale
0 equals the SDXL base bitwise; a batch equals each request alone; step-level flights with other size conditioning
equal each alone; bad size conditioning is one line. And the
layout at full size: a meta-device UNet from SDXL's public config has 70 cross-attention layers at odd
attn_processors indices, which the adapter's keys follow."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import fly
from ipadapter_instruct.engine.errors import EngineError

STEPS = 4
NEG = "blurry, low quality"


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from ipadapter_instruct.engine.tiny import make_tiny_sdxl
    return make_tiny_sdxl(str(tmp_path_factory.mktemp("sdxl") / "tiny"))


@pytest.fixture(scope="module")
def pipe(sdxl):
    from conftest import load_pipe
    return load_pipe(sdxl, sdxl["adapter"])  # (from_pretrained opens an SDXL folder as SDXLPipeline)


@pytest.fixture(scope="module")
def reference(sdxl):
    import os

    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPVisionModelWithProjection

    from ipadapter_instruct.engine.loading import _image_processor_class
    d = StableDiffusionXLPipeline.from_pretrained(
        sdxl["model"], image_encoder=CLIPVisionModelWithProjection.from_pretrained(sdxl["image_encoder"]),
        feature_extractor=_image_processor_class().from_pretrained(sdxl["image_encoder"]))
    d.load_ip_adapter(os.path.dirname(sdxl["adapter"]), subfolder="", weight_name=os.path.basename(sdxl["adapter"]),
                      image_encoder_folder=None)
    d.set_progress_bar_config(disable=True)
    return d


@pytest.fixture(scope="module")
def image():
    return Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))


def theirs(d, image, scale=0.7, seed=3, prompt="a cat", output_type="latent", **kw):
    d.set_ip_adapter_scale(scale)
    return d(prompt, negative_prompt=NEG, ip_adapter_image=image, guidance_scale=6.0, num_inference_steps=STEPS,
             generator=torch.Generator("cpu").manual_seed(seed), output_type=output_type, **kw).images


def ours(p, image, scale=0.7, seed=3, prompt="a cat", output_type="latent", **kw):
    return p(prompt, image, negative_prompt=NEG, scale=scale, guidance_scale=6.0, num_inference_steps=STEPS,
             seed=seed, output_type=output_type, **kw)


def test_an_sdxl_folder_loads_as_sdxl(pipe):
    from ipadapter_instruct.engine.sdxl import SDXLPipeline
    assert isinstance(pipe, SDXLPipeline) and pipe.adapter.kind == "plus"
    assert pipe.unet.config.cross_attention_dim == 64  # both tiny encoders (32 + 32) side by side


@pytest.mark.parametrize("scheduler", [None, "dpmpp_2m"], ids=["euler", "dpmpp_2m"])
def test_plus_sdxl_matches_diffusers(pipe, reference, image, scheduler):
    from diffusers import DPMSolverMultistepScheduler
    saved = reference.scheduler
    if scheduler:
        reference.scheduler = DPMSolverMultistepScheduler.from_config(saved.config)
    try:
        want = theirs(reference, image)
    finally:
        reference.scheduler = saved
    got = ours(pipe, image, scheduler=scheduler)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - ours(pipe, image, scale=0.0, scheduler=scheduler)).abs().max() > 1e-3  # the adapter acts


def test_size_conditioning_matches_diffusers(pipe, reference, image):
    kw = dict(original_size=(128, 96), target_size=(64, 64), crops_coords_top_left=(8, 4))
    want = theirs(reference, image, **kw)
    got = ours(pipe, image, **kw)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - ours(pipe, image)).abs().max() > 1e-3  # the time ids reach the UNet


def test_per_block_scales_match_diffusers(pipe, reference, image):
    scale = {"down": {"block_1": 0.4}, "up": {"block_0": [0.0, 1.0]}}
    want = theirs(reference, image, scale=scale)
    got = ours(pipe, image, scale=scale)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_png_within_one_grey_level(pipe, reference, image):
    want = theirs(reference, image, output_type="pil")[0]
    got = ours(pipe, image, output_type="pil")[0]
    assert np.abs(np.asarray(got, int) - np.asarray(want, int)).max() <= 1


def test_scale_zero_equals_the_sdxl_base_bitwise(sdxl, pipe, image):
    from ipadapter_instruct.engine import Pipeline
    base = Pipeline.from_pretrained(sdxl["model"], device="cpu")
    base.set_progress_bar_config(disable=True)
    want = base("a cat", negative_prompt=NEG, guidance_scale=6.0, num_inference_steps=STEPS, seed=3,
                output_type="latent")
    assert torch.equal(ours(pipe, image, scale=0.0), want)


def test_a_batch_equals_each_request_alone(pipe, image):
    other = image.transpose(Image.FLIP_LEFT_RIGHT)
    batch = pipe(["a cat", "a red boat"], [image, other], negative_prompt=NEG, scale=[0.7, 0.3],
                 guidance_scale=[6.0, 4.0], num_inference_steps=STEPS, seed=[3, 4], output_type="latent")
    for i, (prompt, im, s, g, seed) in enumerate((("a cat", image, 0.7, 6.0, 3), ("a red boat", other, 0.3, 4.0, 4))):
        alone = pipe(prompt, im, negative_prompt=NEG, scale=s, guidance_scale=g, num_inference_steps=STEPS,
                     seed=seed, output_type="latent")
        torch.testing.assert_close(batch[i:i + 1], alone, atol=1e-4, rtol=1e-4)


def test_plain_ip_adapter_sdxl_matches_diffusers(sdxl, image, tmp_path):
    """The plain IP-Adapter SDXL layout (ip-adapter_sdxl*.safetensors: the image encoder's projected, pooled
    embedding to 4 tokens, 2048 wide in SDXL) against diffusers' SDXL pipeline + load_ip_adapter."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPVisionModelWithProjection

    from ipadapter_instruct.engine import Pipeline
    from ipadapter_instruct.engine.loading import _image_processor_class
    from ipadapter_instruct.engine.tiny import tiny_adapter
    unet = UNet2DConditionModel.from_pretrained(sdxl["model"], subfolder="unet")
    torch.manual_seed(0)
    tiny_adapter(str(tmp_path / "plain.safetensors"), unet, kind="plain")
    ours_pipe = Pipeline.from_pretrained(sdxl["model"], image_encoder=sdxl["image_encoder"],
                                         adapter=str(tmp_path / "plain.safetensors"), device="cpu")
    assert ours_pipe.adapter.kind == "plain"
    ours_pipe.set_progress_bar_config(disable=True)
    d = StableDiffusionXLPipeline.from_pretrained(
        sdxl["model"], image_encoder=CLIPVisionModelWithProjection.from_pretrained(sdxl["image_encoder"]),
        feature_extractor=_image_processor_class().from_pretrained(sdxl["image_encoder"]))
    d.load_ip_adapter(str(tmp_path), subfolder="", weight_name="plain.safetensors", image_encoder_folder=None)
    d.set_progress_bar_config(disable=True)
    got = {s: ours(ours_pipe, image, scale=s, original_size=(96, 80)) for s in (0.7, 0.3)}
    for scale, latents in got.items():
        want = theirs(d, image, scale=scale, original_size=(96, 80))
        torch.testing.assert_close(latents, want, atol=1e-4, rtol=1e-4)
    assert (got[0.7] - got[0.3]).abs().max() > 1e-2  # the adapter acts


def test_bad_size_conditioning_is_one_line(pipe, image):
    with pytest.raises(EngineError, match="original_size must be two integers"):
        ours(pipe, image, original_size=(64,))


def test_sdxl_layout_at_full_size():
    """SDXL base 1.0's UNet config (public): 70 cross-attention layers, at the odd attn_processors indices 1..139,
    2048-wide tokens, head dim 64; the adapter's layers follow that order."""
    from ipadapter_instruct.bench.weights import sdxl_modules
    from ipadapter_instruct.engine.adapter import AdapterLayers
    with torch.device("meta"):
        unet = sdxl_modules()[0]
        layers = AdapterLayers(unet, 2048)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # stabilityai/stable-diffusion-xl-base-1.0
    assert len(layers.layers) == 70
    assert sorted(int(i) for i in layers.layers) == list(range(1, 140, 2))
    processors = list(unet.attn_processors)
    for i, name in layers.names.items():
        assert processors[int(i)] == name and name.endswith("attn2.processor")
        k = layers.layers[i]["to_k_ip"]
        assert k.in_features == 2048 and k.out_features % 64 == 0
    total = sum(p.numel() for p in layers.parameters())
    from ipadapter_instruct.engine.projector import InstructProjector, ProjectorConfig
    with torch.device("meta"):  # IP-Adapter+ SDXL's Resampler: dim 1280, depth 4, 20 heads, 16 queries -> 2048
        projector = InstructProjector(ProjectorConfig(dim=1280, depth=4, heads=20, num_queries=16, image_dim=1280,
                                                      output_dim=2048, ff_mult=4, text_dim=None))
    from torch.utils.flop_counter import FlopCounterMode
    x, t = torch.empty(2, 4, 128, 128, device="meta"), torch.full((2,), 999.0, device="meta")
    added = {"text_embeds": torch.empty(2, 1280, device="meta"), "time_ids": torch.empty(2, 6, device="meta")}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:  # one CFG step (2 rows) at 1024 x 1024
        unet(x, t, encoder_hidden_states=torch.empty(2, 77, 2048, device="meta"), added_cond_kwargs=added)
    print(f"SDXL adapter layers: {total / 1e6:.1f} M parameters; IP-Adapter+ SDXL projector: "
          f"{sum(p.numel() for p in projector.parameters()) / 1e6:.1f} M; UNet, 2 rows at 1024 x 1024: "
          f"{counter.get_total_flops() / 1e9:.0f} GFLOP per step")
    assert total == sum(2 * 2048 * unet.get_submodule(n.removesuffix(".processor")).to_k.out_features
                        for n in layers.names.values())


def test_cli_make_tiny_sdxl_and_generate(pipe, image, tmp_path):
    """`make-tiny DIR --sdxl` writes what loads; `generate --model SDXL_DIR` gives the Python API's image."""
    from ipadapter_instruct.engine.__main__ import main
    assert main(["make-tiny", str(tmp_path / "t"), "--sdxl"]) == 0
    assert sorted(os.listdir(tmp_path / "t")) == ["controlnet", "image_encoder", "instruct.safetensors",
                                                  "lora.safetensors", "model", "plus.safetensors"]
    assert main(["make-tiny", str(tmp_path / "u"), "--sdxl", "--edit"]) == 2
    image.save(tmp_path / "cond.png")
    out = tmp_path / "out.png"
    t = tmp_path / "t"
    assert main(["generate", "--model", str(t / "model"), "--image-encoder", str(t / "image_encoder"), "--adapter",
                 str(t / "plus.safetensors"), "--image", str(tmp_path / "cond.png"), "--prompt", "a cat",
                 "--negative-prompt", NEG, "--scale", "0.7", "--guidance-scale", "6", "--steps", str(STEPS),
                 "--seed", "3", "--no-progress", "--device", "cpu", "--original-size", "128,96",
                 "--crops-top-left", "8,4", "--out", str(out)]) == 0
    # the same weights (make-tiny at seed 0 both times), the same size conditioning
    want = ours(pipe, image, output_type="pil", original_size=(128, 96), crops_coords_top_left=(8, 4))[0]
    with Image.open(out) as got:
        assert np.abs(np.asarray(got.convert("RGB"), int) - np.asarray(want, int)).max() <= 1


def test_cli_refuses_size_conditioning_off_sdxl(tiny, tmp_path, capsys):
    from ipadapter_instruct.engine.__main__ import main
    code = main(["generate", "--model", tiny["model"], "--prompt", "a cat", "--steps", "1", "--no-progress",
                 "--original-size", "64,64", "--out", str(tmp_path / "x.png")])
    assert code != 0 and "not an SDXL model" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(SystemExit):
        main(["generate", "--model", tiny["model"], "--original-size", "64", "--out", str(tmp_path / "y.png")])
    assert "expected two non-negative integers" in capsys.readouterr().err


@pytest.mark.parametrize("batching", ["request", "step"])
def test_server_runs_sdxl(pipe, image, batching):
    """`serve --model SDXL_DIR [--batching step]`: the answer equals the pipeline's (its encoder cache holds the
    pooled projections beside the tokens)."""
    from server_utils import InProcessServer, decode_png, png_base64

    from ipadapter_instruct.engine.server.config import ServerConfig
    srv = InProcessServer(ServerConfig(warmup=False, batching=batching), pipe)
    try:
        body = dict(prompt="a cat", negative_prompt=NEG, image=png_base64(image), scale=0.7, guidance_scale=6.0,
                    num_inference_steps=STEPS, seed=3)
        sizes = dict(original_size=[128, 96], crops_coords_top_left=[8, 4])
        for extra in ({}, {}, sizes):  # the second one with the texts cached; the third with size conditioning
            r = srv.request("POST", "/v1/generate", json={**body, **extra})
            assert r.status_code == 200, r.text
            got = decode_png(r.json()["images"][0])
            want = ours(pipe, image, output_type="pil", **{k: tuple(v) for k, v in extra.items()})[0]
            assert np.abs(np.asarray(got, int) - np.asarray(want, int)).max() <= 1
        r = srv.request("POST", "/v1/generate", json={**body, "target_size": [0, 64]})
        assert r.status_code == 422 and "target_size" in r.text
    finally:
        srv.close()
        pipe.set_encoder_cache(None)  # (the server's cache was set on the module's shared pipeline)


def test_an_sd15_server_refuses_sdxl_fields(tiny, cond_image):
    from conftest import load_pipe
    from server_utils import InProcessServer, png_base64

    from ipadapter_instruct.engine.server.config import ServerConfig
    srv = InProcessServer(ServerConfig(warmup=False), load_pipe(tiny, tiny["adapter"]))
    try:
        r = srv.request("POST", "/v1/generate", json=dict(image=png_base64(cond_image), instruct="use the style",
                                                          num_inference_steps=1, original_size=[64, 64]))
        assert r.status_code == 422 and "original_size" in r.text and "SD1.5" in r.text
    finally:
        srv.close()


STEP_REQUESTS = [dict(prompt="a cat", scale=0.7, seed=3, num_inference_steps=5),
                 dict(prompt="a red boat", scale=0.3, seed=4, num_inference_steps=3, guidance_scale=4.0,
                      original_size=(128, 96), crops_coords_top_left=(8, 4), scheduler="euler_a"),
                 dict(prompt="a tree", scale=1.0, seed=5, num_inference_steps=4, target_size=(48, 64),
                      scheduler="ddim")]


def sdxl_alone(pipe, image, r):
    return pipe(image=image, negative_prompt=NEG, output_type="latent", **r)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static-buffers"])
def test_sdxl_flights_joining_mid_flight_equal_alone(pipe, image, static):
    """Step-level batching on SDXL: each flight keeps its own pooled embeddings and time ids per row, so requests
    with other size conditioning, steps and schedulers that join mid-flight give the latents they give alone; the
    same through the CUDA-graph static buffers (eager here) with rows padded to a bucket."""
    from ipadapter_instruct.engine.cuda_graphs import StaticUNet

    wants = [sdxl_alone(pipe, image, r) for r in STEP_REQUESTS]
    if static:
        pipe._static = StaticUNet(pipe.unet, capture=False)
    try:  # 1 joins at 0's third step, with another size conditioning; 2 right after
        out = fly(pipe, [dict(r, image=image, negative_prompt=NEG, output_type="latent") for r in STEP_REQUESTS],
                  {0: [0], 2: [1], 3: [2]})
        padded = {k[0][0] for k in pipe._static.entries} if static else None
    finally:
        pipe._static = None
    for i, want in enumerate(wants):
        torch.testing.assert_close(out[i], want, atol=1e-4, rtol=1e-4, msg=lambda m, i=i: f"request {i}: {m}")
    if static:
        assert padded <= {2, 4, 8} and 8 in padded  # 6 rows ran as 8
    # admitted together (one size conditioning per admission, as the server's key groups them)
    together = pipe.start_many(image=[image, image], negative_prompt=[NEG, NEG], prompt=["a cat", "a red boat"],
                               scale=[0.7, 0.3], seed=[3, 4], num_inference_steps=3, original_size=(128, 96),
                               output_type="latent")
    while not together[0].done:
        pipe.step(together)
    for f, prompt, scale, seed in zip(together, ("a cat", "a red boat"), (0.7, 0.3), (3, 4)):
        want = sdxl_alone(pipe, image, dict(prompt=prompt, scale=scale, seed=seed, num_inference_steps=3,
                                            original_size=(128, 96)))
        torch.testing.assert_close(pipe.finish(f), want, atol=1e-4, rtol=1e-4)
    with pytest.raises(EngineError, match="original_size must be two integers"):
        pipe.start(image=image, prompt="a cat", original_size=(64,))


def test_static_buffers_carry_the_added_conditioning(pipe, image):
    """The CUDA-graph path (its static buffers, run eagerly here): SDXL's pooled embeddings and time ids are copied
    in once per call, so a second call with another prompt and size conditioning replays the same entry and gives
    its own image."""
    from ipadapter_instruct.engine.cuda_graphs import StaticUNet
    calls = [dict(prompt="a cat"), dict(prompt="a red boat", original_size=(128, 96), crops_coords_top_left=(8, 4))]
    wants = [ours(pipe, image, **c) for c in calls]
    pipe._static = StaticUNet(pipe.unet, capture=False)
    try:
        gots = [ours(pipe, image, **c) for c in calls]
        entries = len(pipe._static.entries)
    finally:
        pipe._static = None
    assert entries == 1
    for got, want in zip(gots, wants):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
