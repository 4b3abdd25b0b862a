"""The TensorRT plugin's kernel (packed (B, L, H*D) layout, AOT calling convention) against its references.

Checked against two independent things: its own plain reference, and the general decoupled-attention
reference on the same numbers rearranged to (B, H, L, D). Tolerance as in test_kernels_attention.py.
"""
import pytest
import torch

from conftest import DEVICE, gpu
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.kernels import decoupled_attention_ref
from ipadapter_instruct.kernels.packed_attention import packed_attention, packed_attention_ref

ATOL = {torch.float32: 1e-5, torch.float16: 5e-4}


def make(b, lq, heads, d, lt, li, dtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    scale = (torch.rand(b, generator=g) * 1.5).to(device)
    return r(b, lq, heads * d), r(b, lt, heads * d), r(b, lt, heads * d), r(b, li, heads * d), r(b, li, heads * d), scale


def general(q, k, v, k_ip, v_ip, scale, heads):
    # the same maths through the general kernel contract: (B, L, H*D) -> (B, H, L, D) and back
    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
    out = decoupled_attention_ref(split(q), split(k), split(v), split(k_ip), split(v_ip), scale)
    return out.transpose(1, 2).flatten(2)


def check(args, heads, dtype):
    fp32 = [a.float() for a in args]
    exact = packed_attention_ref(*fp32, heads)
    assert (exact - general(*fp32, heads)).abs().max() < 1e-5  # the two references agree
    got = packed_attention(*args, heads)
    assert got.dtype == dtype and got.shape == args[0].shape
    base = (packed_attention_ref(*args, heads).float() - exact).abs().max().item()
    err = (got.float() - exact).abs().max().item()
    assert err <= 2 * base + ATOL[dtype], f"kernel error {err:.3g} vs PyTorch's {base:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 37, 2, 40, 77, 16), (3, 19, 3, 80, 7, 5), (1, 21, 1, 160, 33, 3),
                                   (2, 1, 2, 64, 9, 1)], ids=["d40", "d80", "d160", "lq1-d64"])
def test_packed_matches_references(shape, dtype):
    b, lq, heads, d, lt, li = shape
    check(make(b, lq, heads, d, lt, li, dtype), heads, dtype)


def test_packed_scale_zero_is_text_attention():
    q, k, v, k_ip, v_ip, _ = make(2, 19, 2, 40, 7, 5, torch.float32)
    zero = torch.zeros(2, device=DEVICE)
    text_only = packed_attention(q, k, v, k[:, :1], v[:, :1] * 0, zero, 2)
    assert torch.equal(packed_attention(q, k, v, k_ip, v_ip, zero, 2), text_only)


def test_packed_contract_errors():
    q, k, v, k_ip, v_ip, s = make(2, 5, 2, 40, 7, 5, torch.float32)
    with pytest.raises(EngineError, match="not a multiple of heads=3"):
        packed_attention_ref(q, k, v, k_ip, v_ip, s, 3)
    with pytest.raises(EngineError, match=r"ip_scale must be a float \(B=2,\)"):
        packed_attention_ref(q, k, v, k_ip, v_ip, s[:1], 2)
    with pytest.raises(EngineError, match="k_ip must be"):
        packed_attention_ref(q, k, v, k_ip[:, :, :8], v_ip, s, 2)


@gpu
@pytest.mark.parametrize("d,lq", [(40, 4096), (80, 1024), (160, 256), (160, 64)])
def test_packed_sd15_shapes_on_gpu(d, lq):
    check(make(2, lq, 8, d, 77, 16, torch.float16), 8, torch.float16)
