"""GEGLU's activation, fused: out = a * gelu(gate) for (a, gate) = the two halves of the projection.

diffusers' GEGLU splits the feed-forward projection in two and runs gelu and the product as separate
kernels (gelu writes a temporary the product reads back). One elementwise kernel reads both halves
once and writes the result once. Exact (erf) GELU, as diffusers' default. `geglu_ref` is the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ipadapter_instruct.kernels.errors import KernelError

from ipadapter_instruct.kernels._runtime import triton_unusable

BLOCK_ROWS = 4
BLOCK_COLS = 1024


@triton.jit
def _geglu_kernel(X, Y, rows, inner, stride_x, stride_y, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    # X: (rows, 2 * inner) = [a | gate] -> Y: (rows, inner)
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    c = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    ok = (r < rows)[:, None] & (c < inner)[None, :]
    row = X + r.to(tl.int64)[:, None] * stride_x
    a = tl.load(row + c[None, :], mask=ok, other=0.0).to(tl.float32)
    g = tl.load(row + inner + c[None, :], mask=ok, other=0.0).to(tl.float32)
    out = a * 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    tl.store(Y + r.to(tl.int64)[:, None] * stride_y + c[None, :], out.to(Y.dtype.element_ty), mask=ok)


def geglu_ref(x: torch.Tensor) -> torch.Tensor:
    # x: (..., 2 * inner) -> (..., inner), as diffusers' GEGLU after its projection
    a, gate = x.chunk(2, dim=-1)
    return a * F.gelu(gate)


def geglu(x: torch.Tensor) -> torch.Tensor:
    """a * gelu(gate) for x = [a | gate] along the last dim, one read and one write."""
    # x: (..., 2 * inner) -> (..., inner) in x's dtype
    if x.shape[-1] % 2:
        raise KernelError(f"geglu needs an even last dimension ([a | gate]), got {tuple(x.shape)}")
    reason = triton_unusable(x.device)
    if reason:
        raise KernelError(f"the triton GEGLU kernel cannot run here: {reason}")
    return _geglu(x)


def _geglu(x: torch.Tensor) -> torch.Tensor:
    # the launch on a checked x (kernels.aot compiles it from here)
    inner = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * inner)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape[0], inner, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(x2.shape[0], BLOCK_ROWS), triton.cdiv(inner, BLOCK_COLS))
    _geglu_kernel[grid](x2, y, x2.shape[0], inner, x2.stride(0), y.stride(0),
                        BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLS=BLOCK_COLS, num_warps=4)
    return y.view(*x.shape[:-1], inner)
