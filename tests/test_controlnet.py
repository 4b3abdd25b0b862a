"""ControlNet (engine/controlnet.py) against diffusers' StableDiffusionControlNetPipeline on the same tiny weights:
plain, with a conditioning scale and a guidance window, guess mode, two nets, and with an IP-Adapter+ image
(diffusers' ControlNet pipeline with load_ip_adapter); scale 0 is no ControlNet; requests with different control
images in one call equal each alone; a ControlNet that does not fit the UNet is one line naming the folder."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import NEGATIVE, PROMPT, fly
from ipadapter_instruct.engine.errors import EngineError

STEPS = 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_controlnet(tiny, folder, seed, unet=None):
    """make-tiny's ControlNet (engine/tiny_parts.py) for `unet` (default: the tiny one) at `seed` -> its folder."""
    from diffusers import UNet2DConditionModel

    from ipadapter_instruct.engine.tiny_parts import tiny_controlnet
    unet = unet or UNet2DConditionModel.from_pretrained(tiny["model"], subfolder="unet")
    return tiny_controlnet(str(folder), unet, seed)


@pytest.fixture(scope="module")
def nets(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet")
    return [make_controlnet(tiny, root / "a", 0), make_controlnet(tiny, root / "b", 1)]


@pytest.fixture(scope="module")
def controls():
    g = np.random.RandomState(1)
    return [Image.fromarray((g.rand(64, 64, 3) * 255).astype("uint8")) for _ in range(2)]


def engine(tiny, nets, adapter=None):
    from ipadapter_instruct.engine import Pipeline
    extra = dict(image_encoder=tiny["image_encoder"], adapter=adapter) if adapter else {}
    pipe = Pipeline.from_pretrained(tiny["model"], device="cpu", controlnet=nets, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_cn(tiny, nets, plus=None):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from transformers import CLIPVisionModelWithProjection

    from ipadapter_instruct.engine.loading import _image_processor_class
    models = [ControlNetModel.from_pretrained(n) for n in nets]
    extra = {}
    if plus is not None:
        extra = dict(image_encoder=CLIPVisionModelWithProjection.from_pretrained(tiny["image_encoder"]),
                     feature_extractor=_image_processor_class().from_pretrained(tiny["image_encoder"]))
    d = StableDiffusionControlNetPipeline.from_pretrained(
        tiny["model"], controlnet=models[0] if len(models) == 1 else models, safety_checker=None,
        requires_safety_checker=False, **extra)
    if plus is not None:
        d.load_ip_adapter(str(plus.parent), subfolder="", weight_name=plus.name, image_encoder_folder=None)
    d.set_progress_bar_config(disable=True)
    return d


def run_d(d, image, **kw):
    return d(PROMPT, image=image, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=6.0,
             generator=torch.Generator("cpu").manual_seed(1), output_type="latent", **kw).images


def run_e(pipe, control, **kw):
    return pipe(PROMPT, negative_prompt=NEGATIVE, control_image=control, num_inference_steps=STEPS, seed=1,
                output_type="latent", **kw)


@pytest.mark.parametrize("kw", [{}, dict(controlnet_conditioning_scale=0.5, control_guidance_start=0.25,
                                        control_guidance_end=0.75), dict(guess_mode=True)])
def test_one_controlnet_matches_diffusers(tiny, nets, controls, kw):
    got = run_e(engine(tiny, nets[0]), controls[0], **kw)
    torch.testing.assert_close(got, run_d(diffusers_cn(tiny, nets[:1]), controls[0], **kw), atol=1e-4, rtol=1e-4)


def test_two_controlnets_match_diffusers(tiny, nets, controls):
    kw = dict(controlnet_conditioning_scale=[0.7, 1.2])
    got = run_e(engine(tiny, nets), list(controls), **kw)
    torch.testing.assert_close(got, run_d(diffusers_cn(tiny, nets), list(controls), **kw), atol=1e-4, rtol=1e-4)
    with pytest.raises(EngineError, match="2 ControlNets are loaded: give control_image as a list of 2"):
        run_e(engine(tiny, nets), controls[0])


def test_with_an_ip_adapter_plus_image(tiny, nets, controls, plus_dir, cond_image):
    d = diffusers_cn(tiny, nets[:1], plus_dir / "plus.safetensors")
    d.set_ip_adapter_scale(0.7)
    want = run_d(d, controls[0], ip_adapter_image=cond_image)
    pipe = engine(tiny, nets[0], str(plus_dir / "plus.safetensors"))
    got = pipe(PROMPT, cond_image, negative_prompt=NEGATIVE, scale=0.7, control_image=controls[0],
               num_inference_steps=STEPS, seed=1, output_type="latent")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_scale_zero_is_no_controlnet_and_a_batch_equals_each_alone(tiny, nets, controls):
    from ipadapter_instruct.engine import Pipeline
    base = Pipeline.from_pretrained(tiny["model"], device="cpu")
    base.set_progress_bar_config(disable=True)
    pipe = engine(tiny, nets[0])
    kw = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, output_type="latent")
    assert torch.equal(pipe(PROMPT, control_image=controls[0], controlnet_conditioning_scale=0.0, seed=1, **kw),
                       base(PROMPT, seed=1, **kw))
    both = pipe([PROMPT, "a blue boat"], control_image=list(controls), controlnet_conditioning_scale=[1.0, 0.4],
                seed=[1, 2], **kw)
    alone = torch.cat([pipe(PROMPT, control_image=controls[0], seed=1, **kw),
                       pipe("a blue boat", control_image=controls[1], controlnet_conditioning_scale=0.4, seed=2, **kw)])
    # a batch of 2 and of 1 take different convolution blockings: on an AVX2 CPU (AMD EPYC) 2 of 2048 elements
    # differ by 1.6e-5 (within 1e-5 on AVX-512 machines); the suite's batch tolerance is 1e-4
    torch.testing.assert_close(both, alone, atol=1e-4, rtol=1e-4)


def test_bad_controlnets_are_one_line(tiny, nets, controls, tmp_path):
    from diffusers import UNet2DConditionModel
    other = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                 block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                 attention_head_dim=8, norm_num_groups=8)
    wrong = make_controlnet(tiny, tmp_path / "wrong", 0, unet=other)
    with pytest.raises(EngineError, match=r"the ControlNet .*wrong does not fit this UNet"):
        engine(tiny, wrong)
    with pytest.raises(EngineError, match="ControlNet folder not found: .*none"):
        engine(tiny, str(tmp_path / "none"))
    with pytest.raises(EngineError, match="give control_image="):
        run_e(engine(tiny, nets[0]), None)
    from ipadapter_instruct.engine import Pipeline
    with pytest.raises(EngineError, match="no ControlNet is loaded"):
        Pipeline.from_pretrained(tiny["model"], device="cpu")(PROMPT, control_image=controls[0], num_inference_steps=1)


def test_cli_controlnet_flags(tiny, nets, controls, tmp_path):
    src, out = tmp_path / "edges.png", tmp_path / "x.png"
    controls[0].save(src)
    r = subprocess.run([sys.executable, "-m", "engine", "generate", "--model", tiny["model"], "--prompt", PROMPT,
                        "--negative-prompt", NEGATIVE, "--steps", str(STEPS), "--seed", "1", "--device", "cpu",
                        "--controlnet", nets[0], "--control-image", str(src), "--controlnet-scale", "0.5",
                        "--no-progress", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    want = engine(tiny, nets[0])(PROMPT, negative_prompt=NEGATIVE, control_image=controls[0],
                                 controlnet_conditioning_scale=0.5, num_inference_steps=STEPS, seed=1)[0]
    assert np.abs(np.asarray(Image.open(out).convert("RGB"), int) - np.asarray(want, int)).max() <= 1


@pytest.mark.parametrize("batching", ["request", "step"])
def test_the_server_takes_a_control_image_per_request(tiny, nets, controls, batching):
    """serve --controlnet DIR [--batching step]: each request sends control_image (and its scale); answers equal the
    pipeline alone, requests with different control images share a call (or steps); a missing one is a 422 naming
    the field."""
    from ipadapter_instruct.engine.server.config import ServerConfig
    from server_utils import InProcessServer, decode_png, png_base64

    pipe = engine(tiny, nets[0])
    server = InProcessServer(ServerConfig(max_wait_ms=300, batching=batching), pipe)
    try:
        bodies = [{"prompt": PROMPT, "negative_prompt": NEGATIVE, "num_inference_steps": 2, "seed": 1,
                   "control_image": png_base64(controls[0])},
                  {"prompt": "a blue boat", "negative_prompt": NEGATIVE, "num_inference_steps": 2, "seed": 2,
                   "control_image": png_base64(controls[1]), "controlnet_conditioning_scale": 0.4}]
        answers = server.concurrently(*[("POST", "/v1/generate", {"json": b}) for b in bodies])
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        shared = [a.json()["timings"]["batch_requests"] for a in answers]
        assert shared == [2, 2] if batching == "request" else max(shared) == 2
        for body, answer in zip(bodies, answers):
            want = pipe(body["prompt"], negative_prompt=NEGATIVE, control_image=controls[bodies.index(body)],
                        controlnet_conditioning_scale=body.get("controlnet_conditioning_scale", 1.0),
                        num_inference_steps=2, seed=body["seed"])[0]
            got = decode_png(answer.json()["images"][0])
            assert np.abs(np.asarray(got, int) - np.asarray(want, int)).max() <= 1
        r = server.request("POST", "/v1/generate", json={"prompt": PROMPT, "num_inference_steps": 1})
        assert r.status_code == 422 and r.json()["error"]["field"] == "control_image", r.text
    finally:
        server.close()


def test_static_buffers_carry_the_residuals(tiny, nets, controls):
    """The CUDA-graph path, run eagerly (capture needs a GPU): the residuals are static buffers copied every step;
    steps outside the guidance window use the entry without them; a second request reuses the entries."""
    from ipadapter_instruct.engine.cuda_graphs import StaticUNet

    pipe = engine(tiny, nets[0])
    kw = dict(control_guidance_start=0.25)
    want = [run_e(pipe, controls[0], **kw), run_e(pipe, controls[1], controlnet_conditioning_scale=0.5, **kw)]
    pipe._static = StaticUNet(pipe.unet, capture=False)
    got = [run_e(pipe, controls[0], **kw)]
    assert len(pipe._static.entries) == 2  # with and without residuals
    got.append(run_e(pipe, controls[1], controlnet_conditioning_scale=0.5, **kw))
    assert len(pipe._static.entries) == 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA-graph capture, fused kernels)")
def test_cuda_graphs_with_a_controlnet_equal_eager(tiny, nets, controls):
    from ipadapter_instruct.engine import Pipeline
    eager = Pipeline.from_pretrained(tiny["model"], device="cuda", dtype="float32", attention_backend="sdpa",
                                     controlnet=nets[0])
    fast = Pipeline.from_pretrained(tiny["model"], device="cuda", dtype="float32", controlnet=nets[0])
    fast.enable_cuda_graphs()
    kw = dict(control_image=controls[0], num_inference_steps=STEPS, seed=1, output_type="latent")
    want = eager(PROMPT, **kw)
    for _ in range(2):  # capture, then replay with this call's residuals copied in
        torch.testing.assert_close(fast(PROMPT, **kw), want, atol=2e-3, rtol=2e-3)


CN_FLIGHTS = [dict(num_inference_steps=5, seed=1),
              dict(num_inference_steps=4, seed=2, controlnet_conditioning_scale=0.5, control_guidance_start=0.25,
                   control_guidance_end=0.75, scheduler="euler_a"),
              dict(num_inference_steps=3, seed=3, guess_mode=True, controlnet_conditioning_scale=0.8),
              dict(num_inference_steps=4, seed=4, controlnet_conditioning_scale=0.0)]


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static-buffers"])
def test_controlnet_flights_joining_mid_flight_equal_alone(tiny, nets, controls, static):
    """Step-level batching with a ControlNet: each flight keeps its control image, scale, guidance window (on its own
    step count) and guess mode; the net runs once per step over the rows it acts on (per guess mode), so flights
    that join mid-flight give what each gives alone, also through the static buffers with padded rows."""
    from ipadapter_instruct.engine.cuda_graphs import StaticUNet

    pipe = engine(tiny, nets[0])
    reqs = [dict(r, prompt=PROMPT, negative_prompt=NEGATIVE, control_image=controls[i % 2], output_type="latent")
            for i, r in enumerate(CN_FLIGHTS)]
    wants = [pipe(**r) for r in reqs]
    if static:
        pipe._static = StaticUNet(pipe.unet, capture=False)
    out = fly(pipe, reqs, {0: [0], 1: [1], 2: [2], 3: [3]})
    for i, want in enumerate(wants):
        torch.testing.assert_close(out[i], want, atol=1e-4, rtol=1e-4, msg=lambda m, i=i: f"flight {i}: {m}")
    assert (wants[0] - wants[3]).abs().max() > 1e-3  # the net acts (scale 0 is the base), or this proves nothing
    together = pipe.start_many(prompt=[PROMPT, "a cat"], negative_prompt=[NEGATIVE, NEGATIVE], control_image=controls,
                               controlnet_conditioning_scale=[0.7, 1.0], seed=[5, 6], num_inference_steps=3,
                               output_type="latent")
    while not together[0].done:
        pipe.step(together)
    for f, prompt, control, scale, seed in zip(together, (PROMPT, "a cat"), controls, (0.7, 1.0), (5, 6)):
        want = pipe(prompt, negative_prompt=NEGATIVE, control_image=control, controlnet_conditioning_scale=scale,
                    seed=seed, num_inference_steps=3, output_type="latent")
        torch.testing.assert_close(pipe.finish(f), want, atol=1e-4, rtol=1e-4)
