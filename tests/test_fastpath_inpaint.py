"""The fast path when a call starts from a photo: the UNet's input then carries the extra channels of a 9-channel
inpainting UNet (mask, masked-photo latent), which must reach the CUDA graphs' static buffers and the compiled UNet
like the latents; img2img and 4-channel inpainting change the start and the steps between UNet calls, not its input.

On the CPU: the static-buffer path runs eagerly (StaticUNet(capture=False), as tests/test_cuda_graphs.py), the
compiled UNet is dynamo's eager backend (as tests/test_compile.py), and the fused kernels (the VAE encoder's
GroupNorm+SiLU among them, new to a call with a photo) run under the Triton interpreter at 32 px, one step.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PROMPT, gpu
from ipadapter_instruct.engine.cuda_graphs import StaticUNet
from pipelines import check_within_rule, exact_fp32


@pytest.fixture(scope="module")
def tiny_inpaint(tmp_path_factory):
    from ipadapter_instruct.engine.tiny import make_tiny
    return make_tiny(str(tmp_path_factory.mktemp("inpaint") / "weights"), inpaint=True)


def pipeline(weights, backend="auto", device="cpu", dtype=None):
    from ipadapter_instruct.engine import Pipeline
    pipe = Pipeline.from_pretrained(weights["model"], image_encoder=weights["image_encoder"],
                                    adapter=weights["adapter"], device=device, dtype=dtype, attention_backend=backend)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def mask(size: int, left: bool) -> Image.Image:
    """White (repaint) on one half, black (keep) on the other."""
    m = np.zeros((size, size), "uint8")
    if left:
        m[:, : size // 2] = 255
    else:
        m[:, size // 2:] = 255
    return Image.fromarray(m)


def photo(seed: int, size: int = 64) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


# two requests at one UNet shape (2 rows, 16 x 16 latents) whose every value differs: photo, mask, strength, seed
INPAINT = [dict(init_image=photo(0), mask_image=mask(64, True), strength=1.0, seed=1, scale=0.8),
           dict(init_image=photo(1), mask_image=mask(64, False), strength=0.75, seed=2, scale=0.3)]
# on a 4-channel UNet: img2img, then inpainting (the kept region re-imposed between steps)
IMG2IMG = [dict(init_image=photo(0), strength=0.5, seed=1), dict(init_image=photo(1), mask_image=mask(64, True),
                                                                   strength=0.75, seed=2)]


def run(pipe, calls, cond_image):
    return [pipe(PROMPT, cond_image, "use the style", num_inference_steps=4, height=64, width=64,
                 output_type="latent", **c) for c in calls]


def through_static_buffers(pipe, calls, cond_image):
    """The calls on the plain path, then through one StaticUNet (eager replay) -> (plain, static, entries)."""
    plain = run(pipe, calls, cond_image)
    pipe._static = StaticUNet(pipe.unet, capture=False)
    try:
        static = run(pipe, calls, cond_image)
        entries = len(pipe._static.entries)
    finally:
        pipe._static = None
    return plain, static, entries


@gpu
def test_cuda_graphs_inpaint_within_the_kernels_rule(tiny_inpaint, cond_image, monkeypatch):
    """Captured and replayed on CUDA (fp16): one graph for both requests, each within the kernels' rule of the fp32
    eager path (not run on this project's machines yet: no GPU lent)."""
    pipe = pipeline(tiny_inpaint, "auto", "cuda", "float16")
    plain = run(pipe, INPAINT, cond_image)
    pipe.enable_cuda_graphs()
    graphed = run(pipe, INPAINT, cond_image)
    assert len(pipe._static.entries) == 1
    exact_fp32(monkeypatch)
    exact = run(pipeline(tiny_inpaint, "reference", "cuda", "float32"), INPAINT, cond_image)
    for i, (got, want, ref) in enumerate(zip(graphed, plain, exact)):
        check_within_rule(got, want, ref, f"request {i} graphed")


def test_static_buffers_carry_the_mask_and_masked_photo_channels(tiny_inpaint, cond_image):
    pipe = pipeline(tiny_inpaint, "sdpa")
    plain, static, entries = through_static_buffers(pipe, INPAINT, cond_image)
    assert entries == 1  # (rows, 9, 16, 16) both times: the second request refreshed the buffers
    for got, want in zip(static, plain):
        assert torch.equal(got, want)
    assert not torch.allclose(static[1], static[0], atol=1e-3)


def test_static_buffers_run_img2img_and_4_channel_inpainting(tiny, cond_image):
    plain, static, entries = through_static_buffers(pipeline(tiny, "sdpa"), IMG2IMG, cond_image)
    assert entries == 1
    for got, want in zip(static, plain):
        assert torch.equal(got, want)


def test_compiled_unet_inpaints_as_the_eager_one(tiny_inpaint, cond_image):
    """fullgraph: the 9-channel input is one graph with the adapter processors; a second request at the same shape
    (other photo, mask, strength) through the same compiled module."""
    pipe = pipeline(tiny_inpaint, "sdpa")
    eager = run(pipe, INPAINT, cond_image)
    torch._dynamo.reset()
    pipe.compile(fullgraph=True, backend="eager")
    try:
        compiled = run(pipe, INPAINT, cond_image)
    finally:
        torch._dynamo.reset()
    for got, want in zip(compiled, eager):
        assert torch.equal(got, want)


def test_fused_kernels_inpaint_as_the_plain_path(tiny_inpaint, cond_image):
    """The Triton kernels (interpreted) in the UNet and in the VAE encoder that encodes the photo and the masked
    photo, against the same call on sdpa / PyTorch."""
    pipe = pipeline(tiny_inpaint, "triton")
    kw = dict(init_image=photo(0, 32), mask_image=mask(32, True), strength=1.0, num_inference_steps=1, seed=3,
              height=32, width=32, output_type="latent")
    fused = pipe(PROMPT, cond_image, "use the style", **kw)
    assert pipe.fast_path_report()["fell_back"] == []
    pipe.set_attention_backend("sdpa")
    plain = pipe(PROMPT, cond_image, "use the style", **kw)
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)
