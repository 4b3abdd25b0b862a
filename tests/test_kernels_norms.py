"""Fused GroupNorm+SiLU and GEGLU against their PyTorch references (interpreter on the CPU, small odd shapes).

Tolerance as everywhere in the kernels: at most FACTOR x plain PyTorch's error in the same dtype against an
fp32 reference, plus ATOL x the reference's largest magnitude, at least 1 (bf16 gets twice the factor under the
interpreter, which truncates to bf16).
"""
import os

import pytest
import torch

from conftest import DEVICE, gpu
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.kernels.geglu import geglu, geglu_ref
from ipadapter_instruct.kernels.groupnorm_silu import group_norm_silu, group_norm_silu_ref

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
FACTOR = {torch.float32: 2.0, torch.float16: 2.0, torch.bfloat16: 4.0 if INTERPRETED else 2.0}


def check_close(got, pytorch, exact, dtype, what):
    assert got.shape == exact.shape and got.dtype == dtype
    err = (got.float() - exact).abs().max().item()
    base = (pytorch.float() - exact).abs().max().item()
    atol = ATOL[dtype] * max(1.0, exact.abs().max().item())  # fp32: PyTorch's own error is 0 by definition
    assert err <= FACTOR[dtype] * base + atol, f"{what}: kernel error {err:.3g} vs PyTorch's {base:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape, groups, shift, silu", [
    ((2, 12, 5, 7), 3, False, True),
    ((1, 8, 33, 33), 2, True, True),      # 4356 elements per group: split over two programs
    ((3, 32, 1, 1), 4, True, True),       # a 1x1 map (the UNet's mid block at small sizes)
    ((2, 20, 6, 3), 5, False, False),     # GroupNorm alone
])
def test_group_norm_silu_matches_reference(shape, groups, shift, silu, channels_last, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(DEVICE, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = (1 + 0.3 * torch.randn(shape[1], generator=g)).to(DEVICE, dtype)
    b = (0.3 * torch.randn(shape[1], generator=g)).to(DEVICE, dtype)
    s = torch.randn(shape[0], shape[1], generator=g).to(DEVICE, dtype) if shift else None
    got = group_norm_silu(x, w, b, groups, 1e-5, silu, s)
    exact = group_norm_silu_ref(x.float(), w.float(), b.float(), groups, 1e-5, silu, None if s is None else s.float())
    check_close(got, group_norm_silu_ref(x, w, b, groups, 1e-5, silu, s), exact, dtype, f"{shape} {channels_last}")
    if channels_last and shape[2] * shape[3] > 1:
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_group_norm_silu_errors():
    x = torch.zeros(1, 6, 2, 2, device=DEVICE)
    with pytest.raises(EngineError, match="C divisible by 4 groups"):
        group_norm_silu(x, torch.ones(6, device=DEVICE), torch.zeros(6, device=DEVICE), 4)
    with pytest.raises(EngineError, match=r"shift must be \(N, C\)"):
        group_norm_silu(x, torch.ones(6, device=DEVICE), torch.zeros(6, device=DEVICE), 3, shift=torch.zeros(6))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 9, 2 * 40), (37, 2 * 1300), (1, 3, 5, 2 * 7)])
def test_geglu_matches_reference(shape, dtype):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(shape[-1])) * 2).to(DEVICE, dtype)
    check_close(geglu(x), geglu_ref(x), geglu_ref(x.float()), dtype, str(shape))
    with pytest.raises(EngineError, match="even last dimension"):
        geglu(x[..., :-1])


def test_fused_unet_and_vae_equal_diffusers_own(tiny, monkeypatch):
    """engine.fastpath routes every SD resnet and GEGLU of the tiny UNet and VAE to the kernels; the outputs
    stay diffusers' within fp32 rounding, and unfuse restores diffusers' own forward exactly."""
    # on a GPU, TF32 convolutions would round the last-bit differences of the fused norms up to 1e-3
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # (matmuls default to full fp32 already)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.activations import GEGLU
    from diffusers.models.resnet import ResnetBlock2D

    from ipadapter_instruct.engine import fastpath
    unet = UNet2DConditionModel.from_pretrained(tiny["model"], subfolder="unet").to(DEVICE).eval()
    vae = AutoencoderKL.from_pretrained(tiny["model"], subfolder="vae").to(DEVICE).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g).to(DEVICE)
    z = torch.randn(1, 4, 4, 4, generator=g).to(DEVICE)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).to(DEVICE)
    with torch.no_grad():
        ref_eps = unet(x, 500, encoder_hidden_states=text).sample
        ref_img = vae.decode(z).sample
        kinds = [m for m in [*unet.modules(), *vae.modules()] if isinstance(m, (ResnetBlock2D, GEGLU))]
        assert fastpath.fuse(unet) + fastpath.fuse(vae) == len(kinds) > 0
        eps, img = unet(x, 500, encoder_hidden_states=text).sample, vae.decode(z).sample
        assert (eps - ref_eps).abs().max() < 1e-4 and (img - ref_img).abs().max() < 1e-4
        assert (eps - ref_eps).abs().max() > 0  # the fused path really ran
        fastpath.unfuse(unet)
        assert torch.equal(unet(x, 500, encoder_hidden_states=text).sample, ref_eps)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_sd15_shapes_on_gpu(channels_last, dtype):
    for c, hw in ((320, 64), (640, 32), (1280, 16), (1280, 8)):
        x = torch.randn(2, c, hw, hw, device="cuda").to(dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        w, b = torch.randn(c, device="cuda").to(dtype), torch.randn(c, device="cuda").to(dtype)
        s = torch.randn(2, c, device="cuda").to(dtype)
        exact = group_norm_silu_ref(x.float(), w.float(), b.float(), 32, 1e-5, True, s.float())
        check_close(group_norm_silu(x, w, b, 32, shift=s), group_norm_silu_ref(x, w, b, 32, shift=s), exact, dtype,
                    f"C{c} {hw}x{hw}")
    x = torch.randn(2, 4096, 2 * 1280, device="cuda").to(dtype)
    check_close(geglu(x), geglu_ref(x), geglu_ref(x.float()), dtype, "geglu 4096x2560")


@pytest.mark.parametrize("device, dtype", [("cpu", torch.float32),
                                           *(pytest.param("cuda", d, marks=gpu) for d in DTYPES)], ids=str)
def test_group_norm_silu_is_deterministic(device, dtype):
    """Chan-merged per-split statistics, no atomics: two runs are bitwise equal (a shape split over two programs
    under the interpreter; SD1.5's resnet sizes on the GPU, with the split counts real launches use)."""
    if device == "cpu" and not INTERPRETED:
        pytest.skip("the CPU runs the kernels only under the interpreter")
    sizes = ((1, 8, 33, 33, 2),) if device == "cpu" else \
        ((2, 320, 64, 64, 32), (2, 640, 32, 32, 32), (2, 1280, 16, 16, 32), (2, 1280, 8, 8, 32))
    g = torch.Generator().manual_seed(7)
    for n, c, h, w, groups in sizes:
        x = (torch.randn(n, c, h, w, generator=g) * 3 + 1).to(device, dtype)
        wt, b, s = (torch.randn(*shape, generator=g).to(device, dtype) for shape in ((c,), (c,), (n, c)))
        for layout in (torch.contiguous_format, torch.channels_last):
            xl = x.contiguous(memory_format=layout)
            first = group_norm_silu(xl, wt, b, groups, 1e-5, True, s)
            assert torch.equal(group_norm_silu(xl, wt, b, groups, 1e-5, True, s), first), (c, h, layout)


def fast_path_stages(pipe, inputs, ip_tokens, call):
    """A pipeline's projector output, one UNet step (on the given adapter tokens, so the step's own error only)
    and the latents after `call`, from the same fp32 inputs cast to the pipeline's dtype."""
    from ipadapter_instruct.engine.attention import AdapterContext, precompute_kv
    from ipadapter_instruct.kernels.projector import projector_forward
    image, instruct, prompt, x, text = (v.to(pipe.dtype) for v in inputs)
    with torch.no_grad():
        fn = projector_forward if pipe._fused_projector else (lambda proj, *a: proj(*a))
        ip = fn(pipe.adapter.projector, image, instruct, prompt)
        tokens = ip if ip_tokens is None else ip_tokens.to(pipe.dtype)
        ctx = AdapterContext(kv=precompute_kv(pipe.unet, pipe.cross, text, tokens),
                             scale={n: torch.full((x.shape[0], 1, 1, 1), 0.8, device="cuda") for n in pipe.cross})
        eps = pipe.unet(x, 500, encoder_hidden_states=text, cross_attention_kwargs={"adapter": ctx}).sample
    return {"projector": ip, "unet step": eps, "latents": pipe(**call)}


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_engine_fast_path_on_gpu(tiny, cond_image, dtype, monkeypatch):
    """The whole fast path (fused attention, projector, GroupNorm+SiLU, GEGLU) per stage, by the kernels' rule:
    its error against an fp32 reference at most twice the plain PyTorch path's error in the same dtype. bf16 here
    is the real bf16 dot of the GPU (the interpreter upcasts bf16, so only the GPU checks it)."""
    from pipelines import exact_fp32, runs_triton, tiny_pipeline
    exact_fp32(monkeypatch)
    name = str(dtype).removeprefix("torch.")
    exact_pipe, plain_pipe = tiny_pipeline(tiny, "cuda", "float32", "reference"), tiny_pipeline(tiny, "cuda", name,
                                                                                                "reference")
    fused_pipe = tiny_pipeline(tiny, "cuda", name)  # auto: triton on CUDA
    assert runs_triton(fused_pipe) and not plain_pipe._fused_projector
    cfg, unet_cfg = exact_pipe.adapter.projector.config, exact_pipe.unet.config
    g = torch.Generator().manual_seed(2)
    rows, text_dim = 2, exact_pipe.text_encoder.config.hidden_size
    inputs = [torch.randn(*shape, generator=g).cuda() for shape in (
        (rows, 5, cfg.image_dim), (rows, 77, text_dim), (rows, 77, text_dim),  # image, instruction, prompt tokens
        (rows, unet_cfg.in_channels, 16, 16), (rows, 77, unet_cfg.cross_attention_dim))]  # latents, text rows
    call = dict(prompt="a red house", image=cond_image, instruct="use the composition", num_inference_steps=4,
                seed=1, output_type="latent")
    exact = fast_path_stages(exact_pipe, inputs, None, call)
    plain, fused = (fast_path_stages(p, inputs, exact["projector"], call) for p in (plain_pipe, fused_pipe))
    for stage in exact:
        check_close(fused[stage], plain[stage], exact[stage].float(), dtype, stage)
