"""Several adapters at once, regional masks, several images per adapter and adapter step ranges, against diffusers'
own multi-adapter support (`load_ip_adapter` with lists, `IPAdapterMaskProcessor`, `set_ip_adapter_scale` from a
step callback) on the same tiny weights, plus the invariants: an adapter with adapter_end=0 is no adapter, and a
batch of different requests equals each request alone."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import NEGATIVE, PROMPT
from ipadapter_instruct.engine.errors import EngineError

STEPS = 4
SIZE = 64  # the tiny model's native size


@pytest.fixture(scope="module")
def two(tiny, plus_dir):
    """Our pipeline with two IP-Adapter+ files, and the paths."""
    from diffusers import UNet2DConditionModel

    from ipadapter_instruct.engine import Pipeline
    from ipadapter_instruct.engine.tiny import tiny_adapter
    b = plus_dir / "plus_b.safetensors"
    if not b.exists():
        torch.manual_seed(21)
        tiny_adapter(str(b), UNet2DConditionModel.from_pretrained(tiny["model"], subfolder="unet"), kind="plus")
    a = plus_dir / "plus.safetensors"
    pipe = Pipeline.from_pretrained(tiny["model"], image_encoder=tiny["image_encoder"], adapter=[str(a), str(b)],
                                    device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe, a, b


@pytest.fixture(scope="module")
def d_two(tiny, two):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPVisionModelWithProjection

    from ipadapter_instruct.engine.loading import _image_processor_class
    _, a, b = two
    d = StableDiffusionPipeline.from_pretrained(
        tiny["model"], safety_checker=None, requires_safety_checker=False,
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(tiny["image_encoder"]),
        feature_extractor=_image_processor_class().from_pretrained(tiny["image_encoder"]))
    d.load_ip_adapter([str(a.parent)] * 2, subfolder=["", ""], weight_name=[a.name, b.name], image_encoder_folder=None)
    d.set_progress_bar_config(disable=True)
    return d


def half_mask(left: bool, size=SIZE) -> Image.Image:
    m = np.zeros((size, size), dtype=np.uint8)
    if left:
        m[:, : size // 2] = 255
    else:
        m[:, size // 2:] = 255
    return Image.fromarray(m)


def diffusers_latents(d, images, seed=7, **kw):
    return d(PROMPT, negative_prompt=NEGATIVE, ip_adapter_image=images, num_inference_steps=STEPS,
             guidance_scale=6.0, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
             **kw).images


def ours(pipe, image, seed=7, **kw):
    return pipe(PROMPT, image, negative_prompt=NEGATIVE, num_inference_steps=STEPS, seed=seed, output_type="latent",
                **kw)


def test_two_adapters_match_diffusers(two, d_two, cond_image, other_image):
    pipe, _, _ = two
    d_two.set_ip_adapter_scale([0.6, 0.9])
    want = diffusers_latents(d_two, [cond_image, other_image])
    got = ours(pipe, [[cond_image, other_image]], scale=[[0.6, 0.9]])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the second adapter matters: off, the result moves
    assert (got - ours(pipe, [[cond_image, other_image]], scale=[[0.6, 0.0]])).abs().max() > 1e-3


def test_regional_masks_match_diffusers(two, d_two, cond_image, other_image):
    from diffusers.image_processor import IPAdapterMaskProcessor
    pipe, _, _ = two
    masks = [half_mask(True), half_mask(False)]
    processed = IPAdapterMaskProcessor().preprocess(masks, height=SIZE, width=SIZE)
    d_two.set_ip_adapter_scale([0.7, 0.8])
    want = diffusers_latents(d_two, [cond_image, other_image],
                             cross_attention_kwargs={"ip_adapter_masks": [processed[0:1], processed[1:2]]})
    got = ours(pipe, [[cond_image, other_image]], scale=[[0.7, 0.8]], adapter_masks=[masks])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - ours(pipe, [[cond_image, other_image]], scale=[[0.7, 0.8]])).abs().max() > 1e-3  # masks matter


def test_several_images_for_one_adapter_match_diffusers(plus_pipe, plus_dir, tiny, cond_image, other_image):
    from test_vs_diffusers import diffusers_pipe
    d = diffusers_pipe(tiny, plus_dir)
    d.set_ip_adapter_scale(0.8)
    want = diffusers_latents(d, [[cond_image, other_image]])
    got = ours(plus_pipe, [[cond_image, other_image]], scale=0.8)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - ours(plus_pipe, cond_image, scale=0.8)).abs().max() > 1e-3


def test_step_range_matches_a_diffusers_scale_callback(two, d_two, cond_image, other_image):
    # adapter 1 acts on the middle half of the steps only (start 0.25, end 0.75); diffusers has no step range, so its
    # reference switches the scale from a step callback: the callback after step i sets the scales step i + 1 uses
    # (a fraction of the scheduler's timesteps, as diffusers' ControlNet rule: PNDM makes 5 for 4 steps)
    pipe, _, _ = two
    scales = [0.6, 0.9]
    d_two.scheduler.set_timesteps(STEPS)
    total = len(d_two.scheduler.timesteps)

    def on(i):
        return not (i / total < 0.25 or (i + 1) / total > 0.75)

    def callback(d, i, t, kwargs):
        d.set_ip_adapter_scale([scales[0], scales[1] if on(i + 1) else 0.0])
        return kwargs
    d_two.set_ip_adapter_scale([scales[0], scales[1] if on(0) else 0.0])
    want = diffusers_latents(d_two, [cond_image, other_image], callback_on_step_end=callback)
    got = ours(pipe, [[cond_image, other_image]], scale=[scales], adapter_start=[[0.0, 0.25]],
               adapter_end=[[1.0, 0.75]])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - ours(pipe, [[cond_image, other_image]], scale=[scales])).abs().max() > 1e-3


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_masked_adapters_with_a_step_range_from_a_photo_match_diffusers(two, d_two, cond_image, other_image, task):
    """Two adapters, each with a regional mask, the second over part of the steps, starting from a photo: diffusers'
    img2img / inpaint pipelines built from the same modules (the range by a scale callback over the cut schedule)."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
    from diffusers.image_processor import IPAdapterMaskProcessor
    pipe, _, _ = two
    d = (StableDiffusionImg2ImgPipeline if task == "img2img" else StableDiffusionInpaintPipeline)(**d_two.components)
    d.set_progress_bar_config(disable=True)
    photo, strength, scales = other_image.resize((SIZE, SIZE)), 0.8, [0.7, 0.8]
    extra = {} if task == "img2img" else {"mask_image": half_mask(True)}
    d.scheduler.set_timesteps(STEPS)  # the timesteps a strength runs: all but the first (steps - int(steps x strength))
    total = len(d.scheduler.timesteps) - (STEPS - int(STEPS * strength))
    masks = [half_mask(True), half_mask(False)]
    processed = IPAdapterMaskProcessor().preprocess(masks, height=SIZE, width=SIZE)

    def on(i):
        return not (i / total < 0.25 or (i + 1) / total > 0.75)

    def callback(d, i, t, kwargs):
        d.set_ip_adapter_scale([scales[0], scales[1] if on(i + 1) else 0.0])
        return kwargs
    d.set_ip_adapter_scale([scales[0], scales[1] if on(0) else 0.0])
    want = diffusers_latents(d, [cond_image, other_image], image=photo, strength=strength, callback_on_step_end=callback,
                             cross_attention_kwargs={"ip_adapter_masks": [processed[0:1], processed[1:2]]}, **extra)
    extra = {"mask_image": extra["mask_image"]} if extra else {}
    got = ours(pipe, [[cond_image, other_image]], scale=[scales], adapter_masks=[masks], adapter_start=[[0.0, 0.25]],
               adapter_end=[[1.0, 0.75]], init_image=photo, strength=strength, height=SIZE, width=SIZE, **extra)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_adapter_end_zero_is_no_adapter(two, tiny, plus_dir, plus_pipe, cond_image, other_image):
    pipe, a, _ = two
    off = ours(pipe, [[cond_image, other_image]], scale=[[0.7, 0.9]], adapter_end=[[1.0, 0.0]])
    alone = ours(plus_pipe, cond_image, scale=0.7)  # plus_pipe holds adapter a alone
    assert torch.equal(off, alone)
    from conftest import load_pipe
    base = load_pipe(tiny, None)
    both_off = ours(pipe, [[cond_image, other_image]], scale=[[0.7, 0.9]], adapter_end=0.0)
    assert torch.equal(both_off, base(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, seed=7,
                                      output_type="latent"))


def test_batch_of_mixed_requests_equals_each_alone(two, cond_image, other_image):
    pipe, _, _ = two
    reqs = [dict(image=[cond_image, other_image], scale=[0.6, 0.9], adapter_masks=[half_mask(True), None],
                 adapter_start=0.0, adapter_end=[1.0, 0.5], seed=3),
            dict(image=other_image, scale=0.5, adapter_masks=None, adapter_start=[0.5, 0.0], adapter_end=1.0,
                 seed=4),
            dict(image=[other_image, cond_image], scale=[{"up": {"block_1": [0.0, 1.0]}}, 0.8],
                 adapter_masks=[half_mask(False), half_mask(True)], adapter_start=0.0, adapter_end=1.0, seed=5)]
    together = pipe([PROMPT] * 3, [r["image"] for r in reqs], negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                    output_type="latent", **{k: [r[k] for r in reqs] for k in reqs[0] if k != "image"})
    for i, r in enumerate(reqs):
        alone = pipe(PROMPT, [r["image"]], negative_prompt=NEGATIVE, num_inference_steps=STEPS, output_type="latent",
                     **{k: [v] for k, v in r.items() if k != "image"})
        # (other batch shapes round differently: 1e-5 was seen exceeded by 1.07e-5 under load)
        torch.testing.assert_close(together[i:i + 1], alone, atol=1e-4, rtol=1e-4)


def test_static_buffers_follow_masks_and_step_ranges(two, cond_image, other_image):
    # the CUDA-graph path's static buffers (run eagerly here) must take the masks and the per-step scales
    from ipadapter_instruct.engine.cuda_graphs import StaticUNet
    pipe, _, _ = two
    kw = dict(scale=[[0.6, 0.9]], adapter_masks=[[half_mask(True), None]], adapter_end=[[1.0, 0.5]])
    eager = ours(pipe, [[cond_image, other_image]], **kw)
    pipe._static = StaticUNet(pipe.unet, capture=False)
    try:
        static = ours(pipe, [[cond_image, other_image]], **kw)
        again = ours(pipe, [[other_image, cond_image]], seed=8, **kw)  # a new request into the same buffers
    finally:
        pipe._static = None
    torch.testing.assert_close(static, eager, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(again, ours(pipe, [[other_image, cond_image]], seed=8, **kw), atol=1e-6, rtol=1e-6)


def test_triton_kernel_takes_two_adapters_and_masks(tiny, two, cond_image, other_image):
    # the fused kernel (under the Triton interpreter here) against the SDPA path for two adapters with masks
    from ipadapter_instruct.engine import Pipeline
    _, a, b = two
    pipe = Pipeline.from_pretrained(tiny["model"], image_encoder=tiny["image_encoder"], adapter=[str(a), str(b)],
                                    device="cpu", attention_backend="triton")
    pipe.set_progress_bar_config(disable=True)
    # 32 px, one step: the interpreted kernel's cost grows with the queries and the UNet calls (the masks are resized to the output, as diffusers)
    kw = dict(scale=[[0.6, 0.9]], adapter_masks=[[half_mask(True), half_mask(False)]], num_inference_steps=1,
              height=32, width=32)
    fused = pipe(PROMPT, [[cond_image, other_image]], seed=7, output_type="latent", **kw)
    pipe.set_attention_backend("sdpa")
    plain = pipe(PROMPT, [[cond_image, other_image]], seed=7, output_type="latent", **kw)
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)


def test_query_lengths_match_the_unet(two):
    # the layer sizes the masks are downsampled to, at a size whose latent halves unevenly (17 x 15)
    from ipadapter_instruct.engine.attention import query_lengths
    pipe, _, _ = two
    seen = {}
    modules = dict(pipe.unet.named_modules())
    hooks = [modules[n[: -len(".processor")]].register_forward_hook(
        lambda m, args, kwargs, out, n=n: seen.__setitem__(n, args[0].shape[1]), with_kwargs=True)
        for n in pipe.cross]
    try:
        with torch.no_grad():
            pipe.unet(torch.zeros(1, 4, 17, 15), 1, encoder_hidden_states=torch.zeros(1, 77, 32))
    finally:
        for h in hooks:
            h.remove()
    want = {n: h * w for n, (h, w) in query_lengths(pipe.unet, 17, 15).items()}
    assert seen == want and len(set(want.values())) > 1


@pytest.mark.parametrize("case,match", [
    ("three images", r"image of request 0 \(with 2 adapters\): got 3 values"),
    ("one mask", r"adapter_masks of request 0 .*got 1 values"),
    ("start after end", "adapter_start 0.8 is after adapter_end 0.2"),
    ("end past 1", r"adapter_end of request 0 .* in \[0, 1\]"),
    ("scale string", "adapter scale of request 0 .* a number or a per-block dict"),
])
def test_bad_input_is_one_line(two, cond_image, case, match):
    pipe, _, _ = two
    kw = {"three images": dict(image=[[cond_image] * 3]),
          "one mask": dict(adapter_masks=[[None]]),
          "start after end": dict(adapter_start=0.8, adapter_end=0.2),
          "end past 1": dict(adapter_end=1.5),
          "scale string": dict(scale=[["x", 1.0]])}[case]
    kw = {"image": cond_image, **kw}
    with pytest.raises(EngineError, match=match):
        pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=2, output_type="latent", **kw)


def test_images_per_adapter_must_agree_in_one_call(two, cond_image, other_image):
    pipe, _, _ = two
    with pytest.raises(EngineError, match="same number of images"):
        pipe([PROMPT] * 2, [[cond_image, other_image], [[cond_image, other_image], other_image]],
             num_inference_steps=2, output_type="latent")


def test_masked_adapter_with_several_images_is_refused(plus_pipe, cond_image, other_image):
    with pytest.raises(EngineError, match="a masked adapter reads one image"):
        plus_pipe(PROMPT, [[cond_image, other_image]], adapter_masks=half_mask(True), num_inference_steps=2,
                  output_type="latent")


def test_adapter_options_need_an_adapter(tiny):
    from conftest import load_pipe
    base = load_pipe(tiny, None)
    with pytest.raises(EngineError, match="adapter_end was given but no adapter is loaded"):
        base(PROMPT, adapter_end=0.5, num_inference_steps=2, output_type="latent")


def test_several_adapters_are_refused_where_not_built(tiny, two):
    from ipadapter_instruct.engine import EditPipeline, Pipeline
    _, a, b = two
    with pytest.raises(EngineError, match="TensorRT engines hold one adapter"):
        Pipeline.from_pretrained(tiny["model"], adapter=[str(a), str(b)], backend="tensorrt", engines="x")
    with pytest.raises(EngineError, match="editing takes one adapter"):
        EditPipeline.from_pretrained(tiny["model"], image_encoder=tiny["image_encoder"], adapter=[str(a), str(b)])



def test_cli_several_adapters_equal_the_api(two, tiny, tmp_path, capsys, cond_image, other_image):
    from ipadapter_instruct.engine.__main__ import main
    pipe, a, b = two
    paths = {}
    for name, im in (("a", cond_image), ("b", other_image), ("mask", half_mask(True))):
        paths[name] = str(tmp_path / f"{name}.png")
        im.save(paths[name])
    out = tmp_path / "out.png"
    code = main(["generate", "--model", tiny["model"], "--image-encoder", tiny["image_encoder"],
                 "--adapter", str(a), "--adapter", str(b), "--image", paths["a"], "--image", paths["b"],
                 "--scale", "0.6", "--scale", "0.9", "--adapter-mask", paths["mask"], "--adapter-mask", "-",
                 "--adapter-end", "0.5", "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--steps", "2",
                 "--seed", "3", "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    from ipadapter_instruct.engine.loading import load_image
    want = pipe(PROMPT, [[load_image(paths["a"]), load_image(paths["b"])]], negative_prompt=NEGATIVE,
                scale=[[0.6, 0.9]], adapter_masks=[[load_image(paths["mask"]), None]], adapter_end=0.5,
                num_inference_steps=2, seed=3)[0]
    with Image.open(out) as got:
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))


@pytest.mark.parametrize("extra,message", [
    (["--scale", "0.5", "--scale", "0.6", "--scale", "0.7"], "--scale is given 3 times for 2 --adapter"),
    (["--adapter-mask", "m.png"], "--adapter-mask is given 1 times for 2 --adapter: give it 2 times"),
])
def test_cli_flag_counts(two, tiny, tmp_path, capsys, extra, message):
    from ipadapter_instruct.engine.__main__ import main
    _, a, b = two
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", tiny["model"], "--image-encoder", tiny["image_encoder"], "--adapter", str(a),
              "--adapter", str(b), "--image", "x.png", *extra, "--out", str(tmp_path / "o.png")])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_the_server_takes_a_mask_and_a_step_range_per_request(tiny, plus_dir, cond_image, other_image):
    """POST /v1/generate with adapter_mask / adapter_start / adapter_end: requests with different ones share a call
    and each equals the pipeline alone; start after end and a mask on a text-only server are 422s naming the field."""
    from conftest import load_pipe
    from ipadapter_instruct.engine.server.config import ServerConfig
    from server_utils import InProcessServer, decode_png, png_base64

    pipe = load_pipe(tiny, plus_dir / "plus.safetensors")
    server = InProcessServer(ServerConfig(max_wait_ms=300), pipe)
    try:
        bodies = [{"prompt": PROMPT, "image": png_base64(cond_image), "adapter_mask": png_base64(half_mask(True)),
                   "num_inference_steps": 2, "seed": 1, "scale": 0.9},
                  {"prompt": PROMPT, "image": png_base64(other_image), "adapter_end": 0.5, "num_inference_steps": 2,
                   "seed": 2}]
        answers = server.concurrently(*[("POST", "/v1/generate", {"json": b}) for b in bodies])
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        assert [a.json()["timings"]["batch_requests"] for a in answers] == [2, 2]
        wants = [pipe(PROMPT, cond_image, adapter_masks=half_mask(True), scale=0.9, num_inference_steps=2, seed=1),
                 pipe(PROMPT, other_image, adapter_end=0.5, num_inference_steps=2, seed=2)]
        for want, answer in zip(wants, answers):
            got = decode_png(answer.json()["images"][0])
            assert np.abs(np.asarray(got, int) - np.asarray(want[0], int)).max() <= 1
        r = server.request("POST", "/v1/generate", json={"prompt": PROMPT, "image": png_base64(cond_image),
                                                         "adapter_start": 0.8, "adapter_end": 0.2})
        assert r.status_code == 422 and "adapter_start 0.8 is after adapter_end 0.2" in r.text, r.text
    finally:
        server.close()
    text_only = InProcessServer(ServerConfig(), load_pipe(tiny, None))
    try:
        r = text_only.request("POST", "/v1/generate", json={"prompt": PROMPT, "adapter_end": 0.5})
        assert r.status_code == 422 and r.json()["error"]["field"] == "adapter_end", r.text
    finally:
        text_only.close()


def test_bench_runs_both_providers_with_two_masked_adapters(tmp_path, capsys):
    """`python -m bench e2e --adapters 2 --adapter-masks`: both sides really hold two adapters and take the masks."""
    import json

    from ipadapter_instruct.bench.__main__ import main
    from ipadapter_instruct.bench.e2e_config import E2EConfig
    from ipadapter_instruct.bench.e2e_providers import DiffusersProvider, EngineProvider
    from ipadapter_instruct.bench.weights import bench_weights

    cache = str(tmp_path / "w")
    path = tmp_path / "e2e.json"
    assert main(["e2e", "--device", "cpu", "--providers", "engine,diffusers", "--adapters", "2", "--adapter-masks",
                 "--batch", "1", "--steps", "2", "--repeats", "1", "--cache", cache, "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert {r["provider"] for r in rows} == {"engine", "diffusers"}
    assert {(r["config"]["adapters"], r["config"]["adapter_masks"]) for r in rows} == {(2, True)}
    cfg = E2EConfig(steps=2, adapters=2, adapter_masks=True)
    paths = bench_weights("tiny", cache)
    engine = EngineProvider("engine", paths, torch.device("cpu"), torch.float32, cfg)
    d = DiffusersProvider(paths, torch.device("cpu"), torch.float32, cfg)
    assert len(engine.pipe.adapters) == 2 and len(d.pipe.unet.encoder_hid_proj.image_projection_layers) == 2
    masked = engine(cond_image_of(64), 1, "latent")
    engine.cfg = E2EConfig(steps=2, adapters=2)
    plain = engine(cond_image_of(64), 1, "latent")
    assert (masked - plain).abs().max() > 1e-4  # the masks reach the engine's call
    assert main(["e2e", "--adapter-masks", "--json", str(tmp_path / "x.json")]) == 2
    assert "--adapter-masks needs --adapters 2" in capsys.readouterr().err


def cond_image_of(size):
    from ipadapter_instruct.engine.demo import draw_condition_image
    return draw_condition_image(size)
