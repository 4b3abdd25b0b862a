"""The fused decoupled-attention kernel against its plain PyTorch reference (and SDPA), forward and backward.

Without a GPU the kernel runs under TRITON_INTERPRET=1 (set by conftest), so shapes are small and odd.
Tolerance (flash-attention's rule): the kernel's error against an fp32 reference is at most FACTOR x the
error of plain PyTorch in the same dtype, plus ATOL x the reference's largest magnitude (at least 1:
in fp32 PyTorch is the reference, so that term is the whole bound). The interpreter converts to bf16 by truncation
rather than rounding (checked: 2x the rounding error), so bf16 gets twice the factor there.
"""
import os

import pytest
import torch

from conftest import DEVICE, gpu
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.kernels import decoupled, decoupled_attention, decoupled_attention_ref, decoupled_attention_sdpa

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ATOL = {torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 5e-3}
FACTOR = {torch.float32: 2.0, torch.float16: 2.0, torch.bfloat16: 4.0 if INTERPRETED else 2.0}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make(b, h, lq, lt, lis, d, dtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    q, k, v = r(b, h, lq, d), r(b, h, lt, d), r(b, h, lt, d)
    k_ips = tuple(r(b, h, li, d) for li in lis)
    v_ips = tuple(r(b, h, li, d) for li in lis)
    return q, k, v, k_ips, v_ips


def as_fp32(t):
    if isinstance(t, tuple):
        return tuple(as_fp32(x) for x in t)
    return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def check_close(got, pytorch, exact, dtype, what=""):
    err = (got.float() - exact.float()).abs().max().item()
    base = (pytorch.float() - exact.float()).abs().max().item()
    atol = ATOL[dtype] * max(1.0, exact.float().abs().max().item())  # fp32: PyTorch's own error is 0 by definition
    assert err <= FACTOR[dtype] * base + atol, f"{what}: kernel error {err:.3g} vs PyTorch's {base:.3g}"


CASES = {  # (B, H, Lq, Lt, Li per adapter, D), options
    "sd-like": ((2, 3, 37, 77, (3,), 40), dict(mask=True)),
    "d80-two-adapters": ((2, 2, 19, 24, (3, 16), 80), dict(ip_mask=True, row_scale=True)),
    "d64-lq1": ((3, 1, 1, 7, (5,), 64), dict(row_scale=True)),
    "d160-li64": ((1, 2, 21, 33, (64,), 160), dict(mask=True, ip_mask=True)),
    "long-text": ((1, 1, 40, 320, (1,), 40), dict()),
}


def arguments(case, dtype, seed=0):
    (b, h, lq, lt, lis, d), opt = CASES[case]
    q, k, v, k_ips, v_ips = make(b, h, lq, lt, lis, d, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    scales = tuple(torch.rand(b, generator=g).to(DEVICE) * 1.5 if opt.get("row_scale") else 0.5 + 0.25 * a
                   for a in range(len(lis)))
    mask = ip_mask = None
    if opt.get("mask"):
        mask = (torch.rand(b, lt, generator=g) > 0.3).to(DEVICE)
        mask[0, 0] = True
    if opt.get("ip_mask"):
        ip_mask = tuple((torch.rand(b, lq, generator=g) > 0.5).float().to(DEVICE) for _ in lis)
    if len(lis) == 1:  # one adapter: plain tensors, as the engine passes them
        k_ips, v_ips, scales = k_ips[0], v_ips[0], scales[0]
        ip_mask = ip_mask[0] if ip_mask else None
    return (q, k, v, k_ips, v_ips, scales), dict(mask=mask, ip_mask=ip_mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_reference(case, dtype):
    args, kw = arguments(case, dtype)
    got = decoupled_attention(*args, **kw)
    assert got.shape == args[0].shape and got.dtype == dtype
    exact = decoupled_attention_ref(*as_fp32(args), **kw)
    check_close(got, decoupled_attention_ref(*args, **kw), exact, dtype, case)


def gradients(fn, args, kw, grad_out, cast=False):
    """The gradients of fn(*args, **kw) for grad_out, for q, k, v, then every k_ip, then every v_ip (args as
    `arguments` gives them); with cast=True computed in fp32 (the exact reference)."""
    several = isinstance(args[3], tuple)
    k_ips, v_ips = (args[3], args[4]) if several else ((args[3],), (args[4],))
    leaves = [(t.float() if cast else t).detach().requires_grad_() for t in (*args[:3], *k_ips, *v_ips)]
    n = len(k_ips)
    ki, vi = leaves[3:3 + n], leaves[3 + n:]
    ki, vi = (tuple(ki), tuple(vi)) if several else (ki[0], vi[0])
    fn(*leaves[:3], ki, vi, args[5], **kw).backward(grad_out.to(leaves[0].dtype))
    names = ["dq", "dk", "dv"] + [f"dk_ip{a}" for a in range(n)] + [f"dv_ip{a}" for a in range(n)]
    return dict(zip(names, (t.grad for t in leaves)))


def check_gradients(args, kw, dtype, what, seed=9):
    grad_out = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(seed)).to(args[0].device, dtype)
    got = gradients(decoupled_attention, args, kw, grad_out)
    plain = gradients(decoupled_attention_ref, args, kw, grad_out)
    exact = gradients(decoupled_attention_ref, args, kw, grad_out, cast=True)
    for name in exact:
        assert got[name].dtype == dtype
        check_close(got[name], plain[name], exact[name], dtype, f"{what} {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["sd-like", "d80-two-adapters", "d160-li64"])
def test_backward_matches_reference(case, dtype):
    args, kw = arguments(case, dtype, seed=3)
    check_gradients(args, kw, dtype, case)


def test_scale_zero_is_the_text_attention_exactly():
    (q, k, v, ki, vi, _), kw = arguments("sd-like", torch.float32)
    text_only = decoupled_attention(q, k, v, None, None, 0.0, mask=kw["mask"])
    assert torch.equal(decoupled_attention(q, k, v, ki, vi, 0.0, **kw), text_only)
    assert torch.allclose(text_only, decoupled_attention_ref(q, k, v, None, None, 0.0, mask=kw["mask"]), atol=1e-5)


def test_per_row_scales_equal_each_row_alone():
    (q, k, v, ki, vi, _), _ = arguments("d80-two-adapters", torch.float32)
    scales = (torch.tensor([0.3, 1.1], device=DEVICE), torch.tensor([0.0, 0.6], device=DEVICE))
    batched = decoupled_attention(q, k, v, ki, vi, scales)
    for row in range(2):
        alone = decoupled_attention(q[row:row + 1], k[row:row + 1], v[row:row + 1],
                                    tuple(t[row:row + 1] for t in ki), tuple(t[row:row + 1] for t in vi),
                                    tuple(float(s[row]) for s in scales))
        assert torch.allclose(batched[row:row + 1], alone, atol=1e-6)


def test_fully_masked_text_row_leaves_only_the_adapter():
    q, k, v, (ki,), (vi,) = make(2, 2, 9, 11, (4,), 40, torch.float32)
    mask = torch.ones(2, 11, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    got = decoupled_attention(q, k, v, ki, vi, 0.7, mask=mask)
    assert torch.isfinite(got).all()
    adapter_only = 0.7 * decoupled_attention(q, ki, vi, None, None, 0.0)
    assert torch.allclose(got[1], adapter_only[1], atol=1e-5)
    assert torch.allclose(got, decoupled_attention_ref(q, k, v, ki, vi, 0.7, mask=mask), atol=1e-5)


def test_output_is_laid_out_for_the_output_projection():
    # the engine reshapes (B, H, Lq, D) -> (B, Lq, H*D): the kernel writes (B, Lq, H, D) so that is free
    (q, k, v, ki, vi, s), kw = arguments("sd-like", torch.float32)
    out = decoupled_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, ki, vi, s, **kw)
    assert out.transpose(1, 2).is_contiguous()
    assert torch.allclose(out, decoupled_attention(q.contiguous(), k, v, ki, vi, s, **kw), atol=1e-6)


def test_sdpa_backend_matches_reference():
    args, kw = arguments("d80-two-adapters", torch.float32)
    assert torch.allclose(decoupled_attention_sdpa(*args, **kw), decoupled_attention_ref(*args, **kw), atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    (lambda a: {**a, "q": a["q"][0]}, "q must be (B, H, Lq, D)"),
    (lambda a: {**a, "k": a["k"][:, :, :, :8]}, "k must be"),
    (lambda a: {**a, "v_ip": a["v_ip"][:, :, :1]}, "k_ip and v_ip must both be"),
    (lambda a: {**a, "scale": torch.ones(5)}, "scale must be a float or a (B=2,) tensor"),
    (lambda a: {**a, "mask": torch.ones(2, 77)}, "mask must be bool (B=2, Lt=77)"),
    (lambda a: {**a, "ip_mask": torch.ones(2, 3)}, "ip_mask must be float (B=2, Lq=37)"),
    (lambda a: {**a, "scale": (0.5, 0.5)}, "got 1 adapters but 2 scales"),
    (lambda a: {**a, "scale": torch.ones(2, requires_grad=True)}, "no gradient for scale"),
])
def test_contract_errors_are_one_line(bad, message):
    (q, k, v, ki, vi, _), _ = arguments("sd-like", torch.float32)
    a = bad(dict(q=q, k=k, v=v, k_ip=ki, v_ip=vi, scale=0.5, mask=None, ip_mask=None))
    with pytest.raises(EngineError) as e:
        decoupled_attention(**a)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_registry_runs_the_chosen_backend():
    args, kw = arguments("sd-like", torch.float32)
    ref = decoupled_attention_ref(*args, **kw)
    for backend in ("triton", "sdpa", "reference", "auto"):
        assert torch.allclose(decoupled(*args, **kw, backend=backend), ref, atol=1e-5), backend


@pytest.fixture(params=[pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETED, reason="the CPU runs the "
                                      "kernels only under the interpreter (on a GPU machine the cuda case runs)")),
                        pytest.param("cuda", marks=gpu)])
def fp32_pipe(request, instruct_pipe, tiny, monkeypatch):
    """The tiny instruct pipeline in fp32 where the triton backend runs: the CPU (interpreter) or CUDA."""
    if request.param == "cpu":
        return instruct_pipe
    from pipelines import exact_fp32, tiny_pipeline
    exact_fp32(monkeypatch)  # TF32 convolutions would round the fused norms' last-bit differences up to ~1e-3
    return tiny_pipeline(tiny, "cuda", "float32")


def test_engine_latents_with_triton_kernels_equal_reference(fp32_pipe, cond_image):
    from conftest import PROMPT
    from pipelines import runs_triton
    call = dict(prompt=PROMPT, image=cond_image, instruct="use the style", num_inference_steps=1, seed=4,
                output_type="latent", scale=0.9, height=32, width=32)  # 32 px: the interpreter's cost grows with Lq
    out = {}
    try:
        for backend in ("reference", "triton"):
            fp32_pipe.set_attention_backend(backend)
            assert fp32_pipe._fused_projector == (backend == "triton")  # the projector follows the choice
            assert runs_triton(fp32_pipe) == (backend == "triton")  # the kernels really run
            out[backend] = fp32_pipe(**call)
    finally:
        fp32_pipe.set_attention_backend("auto")
    assert torch.allclose(out["triton"], out["reference"], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out["reference"], fp32_pipe(**{**call, "scale": 0.0}), atol=1e-3)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lq, d", [(4096, 40), (1024, 80), (256, 160), (64, 160)])
def test_sd15_shapes_on_gpu(lq, d, dtype):
    q, k, v, (ki,), (vi,) = make(2, 8, lq, 77, (16,), d, dtype)
    scale = torch.tensor([0.0, 0.8], device="cuda")
    exact = decoupled_attention_ref(*as_fp32((q, k, v, ki, vi)), scale)
    check_close(decoupled_attention(q, k, v, ki, vi, scale), decoupled_attention_ref(q, k, v, ki, vi, scale),
                exact, dtype, f"Lq {lq} D {d}")


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lq, d", [(4096, 40), (1024, 80), (256, 160)])
def test_sd15_backward_on_gpu(lq, d, dtype):
    """Every gradient at SD1.5 shapes, in the dtypes training autocasts to: bf16 here is the GPU's real bf16 dot
    (the interpreter upcasts bf16, so only this test checks it), with per-row scales and a text mask."""
    q, k, v, (ki,), (vi,) = make(2, 8, lq, 77, (16,), d, dtype, seed=5)
    mask = torch.ones(2, 77, dtype=torch.bool, device="cuda")
    mask[1, 60:] = False
    check_gradients((q, k, v, ki, vi, torch.tensor([0.4, 0.8], device="cuda")), dict(mask=mask), dtype,
                    f"Lq {lq} D {d}")
