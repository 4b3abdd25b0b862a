"""diffusers' habits and one set of names in the Python API (issue 28): the call's output is the old list with
`.images`, `.seeds` and `.timings`; no seed draws a fresh one, which reproduces its image when sent back (each
image of a request its own); `ip_adapter_image=` everywhere with the old names as aliases; the adapter's default
prompts only with an adapter; `from_pretrained(torch_dtype=)` and `pipe.to(device, dtype)`."""
import pickle

import numpy as np
import pytest
import torch

from conftest import GPU_SKIP, NEGATIVE, PROMPT, gpu, load_pipe
from ipadapter_instruct.engine import DEFAULT_NEGATIVE, DEFAULT_PROMPT
from ipadapter_instruct.engine.errors import EngineError

STEPS = 2
INSTRUCT = "take the object"


def pixels(images):
    return [np.asarray(im.convert("RGB")) for im in images]


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b)))


def close(a, b):
    """Batch shapes round float sums differently: one grey level, the suite's rule across batch shapes."""
    return len(a) == len(b) and all(np.abs(x.astype(int) - y.astype(int)).max() <= 1
                                    for x, y in zip(pixels(a), pixels(b)))


def call(pipe, image, **kw):
    return pipe(PROMPT, image, INSTRUCT, NEGATIVE, num_inference_steps=STEPS, **kw)


@pytest.fixture(scope="module")
def text_pipe(tiny):
    return load_pipe(tiny, None)


# ----- the output ----------------------------------------------------------------------------------------------

def test_output_is_the_list_with_images_seeds_and_timings(instruct_pipe, cond_image):
    out = call(instruct_pipe, cond_image, seed=[3, 40], num_images_per_prompt=2)
    assert isinstance(out, list) and len(out) == 4 and out == list(out) and list(out) == out.images
    assert out.images[1] is out[1] and [im.size for im in out] == [(64, 64)] * 4
    assert out.seeds == [3, 4, 40, 41]  # request-major, one per image
    assert out.timings == instruct_pipe.timings and out.timings["total_ms"] > 0
    back = pickle.loads(pickle.dumps(out))  # (Ray and the server's worker processes pickle it)
    assert back.seeds == out.seeds and back.timings == out.timings and same(back, out)


def test_latent_output_is_the_tensor_with_seeds(instruct_pipe, cond_image):
    out = call(instruct_pipe, cond_image, seed=3, output_type="latent")
    assert isinstance(out, torch.Tensor) and out.shape == (1, 4, 16, 16) and out.images is out
    assert out.seeds == [3] and out.timings == instruct_pipe.timings
    plain = out.as_subclass(torch.Tensor)  # what callers did with it before: arithmetic, comparisons, cat
    assert type(out * 2) is torch.Tensor and torch.equal(torch.cat([out, plain]), torch.cat([plain, plain]))
    back = pickle.loads(pickle.dumps(out))
    assert torch.equal(back, out) and back.seeds == [3]


# ----- seeds ---------------------------------------------------------------------------------------------------

def test_no_seed_draws_one_and_each_image_comes_back_from_its_seed(instruct_pipe, cond_image):
    first = call(instruct_pipe, cond_image, num_images_per_prompt=2)
    again = call(instruct_pipe, cond_image, num_images_per_prompt=2)
    for out in (first, again):
        assert all(isinstance(s, int) and 0 <= s < 2 ** 63 for s in out.seeds)
        assert out.seeds[1] == out.seeds[0] + 1
    assert first.seeds != again.seeds and not same(first, again)
    for j in range(2):
        assert close(call(instruct_pipe, cond_image, seed=first.seeds[j]), first[j:j + 1])
    assert not same(first[:1], first[1:])


def test_a_seed_is_the_generator_of_diffusers(instruct_pipe, cond_image):
    ours = call(instruct_pipe, cond_image, seed=9, output_type="latent")
    theirs = call(instruct_pipe, cond_image, generator=torch.Generator().manual_seed(9), output_type="latent")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert theirs.seeds == [None]  # a generator's state is the caller's: no seed to report


@pytest.mark.parametrize("seed", [-1, 1.5, True, "3", 2 ** 63])
def test_bad_seed_is_one_line(instruct_pipe, cond_image, seed):
    with pytest.raises(EngineError, match="seed") as e:
        call(instruct_pipe, cond_image, seed=seed)
    assert len(str(e.value).splitlines()) == 1


# ----- names ---------------------------------------------------------------------------------------------------

def test_ip_adapter_image_is_the_reference(instruct_pipe, cond_image):
    new = instruct_pipe(PROMPT, instruct=INSTRUCT, ip_adapter_image=cond_image, num_inference_steps=STEPS, seed=2)
    old = instruct_pipe(PROMPT, instruct=INSTRUCT, image=cond_image, num_inference_steps=STEPS, seed=2)
    assert same(new, old)
    with pytest.raises(EngineError, match="ip_adapter_image") as e:
        instruct_pipe(PROMPT, cond_image, INSTRUCT, ip_adapter_image=cond_image, num_inference_steps=STEPS)
    assert len(str(e.value).splitlines()) == 1


def test_flights_take_the_new_names_and_report_seeds(instruct_pipe, cond_image):
    flight = instruct_pipe.start(prompt=PROMPT, ip_adapter_image=cond_image, instruct=INSTRUCT,
                                 num_inference_steps=STEPS)
    assert len(flight.seeds) == 1 and isinstance(flight.seeds[0], int)
    while not flight.done:
        instruct_pipe.step([flight])
    assert same(instruct_pipe.finish(flight), instruct_pipe(PROMPT, cond_image, INSTRUCT, seed=flight.seeds[0],
                                                            num_inference_steps=STEPS))


# ----- the adapter's default prompts -----------------------------------------------------------------------------

def test_adapter_default_prompts_only_with_an_adapter(instruct_pipe, text_pipe, cond_image):
    defaulted = instruct_pipe(ip_adapter_image=cond_image, instruct=INSTRUCT, num_inference_steps=STEPS, seed=1)
    spelled = instruct_pipe(DEFAULT_PROMPT, cond_image, INSTRUCT, DEFAULT_NEGATIVE, num_inference_steps=STEPS, seed=1)
    assert same(defaulted, spelled)
    with pytest.raises(EngineError, match="prompt"):
        text_pipe(num_inference_steps=STEPS)
    none = text_pipe("a cat", num_inference_steps=STEPS, seed=1)
    assert same(none, text_pipe("a cat", negative_prompt="", num_inference_steps=STEPS, seed=1))
    assert not same(none, text_pipe("a cat", negative_prompt=DEFAULT_NEGATIVE, num_inference_steps=STEPS, seed=1))


# ----- torch_dtype and .to() -------------------------------------------------------------------------------------

def test_from_pretrained_takes_torch_dtype(tiny):
    from ipadapter_instruct.engine import Pipeline
    pipe = Pipeline.from_pretrained(tiny["model"], device="cpu", torch_dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16 and next(pipe.unet.parameters()).dtype == torch.bfloat16
    same_twice = Pipeline.from_pretrained(tiny["model"], device="cpu", dtype="bfloat16", torch_dtype=torch.bfloat16)
    assert same_twice.dtype == torch.bfloat16
    with pytest.raises(EngineError, match="torch_dtype"):
        Pipeline.from_pretrained(tiny["model"], device="cpu", dtype="float32", torch_dtype=torch.bfloat16)


def module_dtypes(pipe) -> set:
    mods = [pipe.unet, pipe.vae, pipe.text_encoder, pipe.image_encoder, pipe.adapter.projector, pipe.adapter.layers]
    return {p.dtype for m in mods for p in m.parameters()} | {p.device.type for m in mods for p in m.parameters()}


def test_to_moves_every_module_and_round_trips(tiny, cond_image):
    from ipadapter_instruct.engine.moving import modules
    pipe = load_pipe(tiny, tiny["adapter"])  # (its own: the session's pipe stays float32)
    assert pipe.to(torch.bfloat16) is pipe and pipe.dtype == torch.bfloat16
    assert module_dtypes(pipe) == {torch.bfloat16, "cpu"}
    half = call(pipe, cond_image, seed=5, output_type="latent")
    assert half.dtype == torch.bfloat16 and torch.isfinite(half.float()).all()
    assert pipe.to("cpu", torch.float32) is pipe and module_dtypes(pipe) == {torch.float32, "cpu"}
    # back in float32 it runs as a float32 pipeline whose weights went through bfloat16 (no kernel or cache of the
    # bfloat16 run left behind)
    rounded = load_pipe(tiny, tiny["adapter"])
    with torch.no_grad():
        for m in modules(rounded):
            for t in [*m.parameters(), *m.buffers()]:
                if t.is_floating_point():
                    t.copy_(t.to(torch.bfloat16).float())
    assert same(call(pipe, cond_image, seed=5), call(rounded, cond_image, seed=5))
    assert pipe.fast_path_report()["fused"] == rounded.fast_path_report()["fused"]
    pipe.to(torch_dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16
    pipe.to(device=torch.device("cpu"), dtype=torch.float32)
    assert pipe.dtype == torch.float32 and torch.isfinite(call(pipe, cond_image, seed=5, output_type="latent")).all()


def test_to_refuses_what_it_cannot_do(text_pipe):
    with pytest.raises(EngineError, match="torch_dtype"):
        text_pipe.to(dtype=torch.float32, torch_dtype=torch.bfloat16)
    with pytest.raises(EngineError, match="not a device"):
        text_pipe.to("gpu")
    with pytest.raises(EngineError, match="a device and a dtype"):
        text_pipe.to("cpu", "cuda")
    with pytest.raises(EngineError, match="float16"):  # the kernels take float32, float16 and bfloat16
        text_pipe.to(torch.float64)
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="CUDA"):
            text_pipe.to("cuda")
    text_pipe.set_encoder_cache(object())
    try:
        with pytest.raises(EngineError, match="encoder cache"):
            text_pipe.to(torch.bfloat16)
    finally:
        text_pipe.set_encoder_cache(None)
    assert text_pipe.dtype == torch.float32


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=GPU_SKIP)
def test_to_cuda_and_back(tiny, cond_image):
    pipe = load_pipe(tiny, tiny["adapter"])
    pipe.to("cuda", torch.float16)
    assert module_dtypes(pipe) == {torch.float16, "cuda"}
    pipe.enable_cuda_graphs()
    assert torch.isfinite(call(pipe, cond_image, seed=5, output_type="latent")).all()
    with pytest.raises(EngineError, match="CUDA graphs"):
        pipe.to("cpu")
    pipe.enable_cuda_graphs(False)
    pipe.to("cuda", torch.float32).to("cpu")
    assert module_dtypes(pipe) == {torch.float32, "cpu"}
    assert torch.isfinite(call(pipe, cond_image, seed=5, output_type="latent")).all()


# ----- SDXL and editing: the same names ----------------------------------------------------------------------------

def test_sdxl_output_and_names(tmp_path_factory, cond_image):
    from ipadapter_instruct.engine.tiny import make_tiny_sdxl
    sdxl = make_tiny_sdxl(str(tmp_path_factory.mktemp("sdxl") / "tiny"))
    pipe = load_pipe(sdxl, sdxl["adapter"])
    out = pipe("a cat", ip_adapter_image=cond_image, num_inference_steps=STEPS, num_images_per_prompt=2)
    assert len(out) == 2 and out.seeds[1] == out.seeds[0] + 1 and out.timings == pipe.timings
    again = pipe("a cat", image=cond_image, num_inference_steps=STEPS, seed=out.seeds[1])
    assert close(again, out[1:])


def test_edit_names_defaults_and_seeds(tmp_path_factory, cond_image):
    import inspect

    from ipadapter_instruct.engine import EditPipeline, Pipeline
    from ipadapter_instruct.engine.tiny import make_tiny
    tiny = make_tiny(str(tmp_path_factory.mktemp("edit") / "weights"), edit=True)
    pipe = EditPipeline.from_pretrained(tiny["model"], image_encoder=tiny["image_encoder"], adapter=tiny["adapter"],
                                        device="cpu", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    ours, theirs = (inspect.signature(c.__call__).parameters for c in (EditPipeline, Pipeline))
    for name in ("num_inference_steps", "num_images_per_prompt", "guidance_scale", "negative_prompt", "seed",
                 "ip_adapter_image", "generator", "output_type", "scale", "instruct"):
        assert name in ours and name in theirs, name
    assert ours["seed"].default is None and ours["num_images_per_prompt"].default == 1
    photo = cond_image.resize((40, 48))
    kw = dict(instruct=INSTRUCT, num_inference_steps=STEPS)
    out = pipe("make it winter", photo, ip_adapter_image=cond_image, **kw)
    assert len(out.seeds) == 1 and isinstance(out.seeds[0], int)
    assert same(pipe("make it winter", photo, adapter_image=cond_image, seed=out.seeds[0], **kw), out)
    with pytest.raises(EngineError, match="ip_adapter_image"):
        pipe("make it winter", photo, adapter_image=cond_image, ip_adapter_image=cond_image, **kw)
