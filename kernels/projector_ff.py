"""Fused feed-forward block of the instruct projector: LayerNorm -> Linear -> GELU -> Linear -> + residual.

One Triton launch normalises the rows while loading them into the first GEMM and applies the exact (erf)
GELU in its epilogue, so the normalised rows never reach memory; the second Linear and the residual add
are one `torch.addmm`. The two `@triton.jit` helpers `row_stats` and `ln_matmul` (a LayerNorm applied
on the fly to a GEMM's A operand) are shared with the Perceiver attention kernel in `kernels.projector`.
All accumulation is fp32; the dot products go through `attention_blocks.mma` (IEEE for fp32, no TF32).

`feed_forward_ref` is the plain PyTorch reference with the same signature.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ipadapter_instruct.kernels.errors import KernelError

from ipadapter_instruct.kernels._runtime import triton_unusable
from ipadapter_instruct.kernels.attention_blocks import dot_precision, mma

BLOCK_M = 16    # rows (batch x queries) per program: SD1.5 has 16 queries per request
BLOCK_H = 64    # hidden units per program
BLOCK_K = 64    # model-width chunk per GEMM step
NUM_WARPS = 8   # 46 registers at 8 warps against 64 at 4, no spills (python -m ipadapter_instruct.kernels.aot, sm_90)


@triton.jit
def row_stats(ptr, rows, rmask, stride, DIM, eps, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # rows: (BLOCK_R,) row indices of a (*, DIM) matrix -> mean, rstd: (BLOCK_R,) fp32, as torch's LayerNorm
    cols = tl.arange(0, BLOCK_K)
    total = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, DIM, BLOCK_K):
        m = rmask[:, None] & (k0 + cols < DIM)[None, :]
        total += tl.load(ptr + rows[:, None] * stride + (k0 + cols)[None, :], mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(total, axis=1) / DIM
    sq = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, DIM, BLOCK_K):
        m = rmask[:, None] & (k0 + cols < DIM)[None, :]
        x = tl.load(ptr + rows[:, None] * stride + (k0 + cols)[None, :], mask=m, other=0.0).to(tl.float32)
        d = tl.where(m, x - mean[:, None], 0.0)
        sq += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=1) / DIM + eps)
    return mean, rstd


@triton.jit
def ln_matmul(ptr, rows, rmask, stride, mean, rstd, LN_W, LN_B, W, outs, omask, DIM,
               BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    # LayerNorm(A[rows]) @ W[outs]^T with A: (*, DIM), W: (*, DIM) contiguous -> (BLOCK_R, BLOCK_O) fp32
    acc = tl.zeros([BLOCK_R, BLOCK_O], dtype=tl.float32)
    for k0 in range(0, DIM, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < DIM
        m = rmask[:, None] & cmask[None, :]
        a = tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=m, other=0.0).to(tl.float32)
        g = tl.load(LN_W + cols, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(LN_B + cols, mask=cmask, other=0.0).to(tl.float32)
        a = tl.where(m, (a - mean[:, None]) * rstd[:, None] * g[None, :] + b[None, :], 0.0)
        w = tl.load(W + outs[None, :] * DIM + cols[:, None], mask=omask[None, :] & cmask[:, None], other=0.0)
        acc += mma(a.to(w.dtype), w, PRECISION)
    return acc


@triton.jit
def _ln_linear_gelu_kernel(X, Y, LN_W, LN_B, W, M, DIM, HIDDEN, stride_xm, stride_ym, eps,
                           BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                           PRECISION: tl.constexpr):
    # X: (M, DIM); W: (HIDDEN, DIM) -> Y: (M, HIDDEN) = gelu(LayerNorm(X) @ W^T)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask, omask = rows < M, outs < HIDDEN
    mean, rstd = row_stats(X, rows, rmask, stride_xm, DIM, eps, BLOCK_M, BLOCK_K)
    h = ln_matmul(X, rows, rmask, stride_xm, mean, rstd, LN_W, LN_B, W, outs, omask, DIM,
                   BLOCK_M, BLOCK_H, BLOCK_K, PRECISION)
    h = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    tl.store(Y + rows[:, None] * stride_ym + outs[None, :], h.to(Y.dtype.element_ty),
             mask=rmask[:, None] & omask[None, :])


def check_tensors(what: str, *tensors: torch.Tensor) -> None:
    """One KernelError when Triton cannot run on these tensors or their dtypes/devices differ."""
    first = tensors[0]
    reason = triton_unusable(first.device)
    if reason:
        raise KernelError(f"the fused {what} cannot run: {reason}")
    if first.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise KernelError(f"the fused {what} takes float32, float16 or bfloat16 tensors, got {first.dtype}")
    for t in tensors[1:]:
        if t.dtype != first.dtype or t.device != first.device:
            raise KernelError(f"the fused {what} needs all tensors on one device in one dtype: got {first.dtype} on "
                              f"{first.device} and {t.dtype} on {t.device}")


def _ln_linear_gelu(x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, w1: torch.Tensor, eps: float):
    # x: (M, dim); w1: (hidden, dim) -> (M, hidden)
    m, dim = x.shape
    hidden = w1.shape[0]
    y = torch.empty(m, hidden, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(hidden, BLOCK_H))
    _ln_linear_gelu_kernel[grid](x, y, ln_w, ln_b, w1.contiguous(), m, dim, hidden, x.stride(0), y.stride(0), eps,
                                 BLOCK_M=BLOCK_M, BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K,
                                 PRECISION=dot_precision(x.dtype), num_warps=NUM_WARPS)
    return y


def feed_forward(latents: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, w1: torch.Tensor,
                 w2: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """latents + Linear2(GELU(Linear1(LayerNorm(latents)))): the projector's FF block with its residual."""
    # latents: (B, Q, dim); ln_w, ln_b: (dim,); w1: (hidden, dim); w2: (dim, hidden) -> (B, Q, dim)
    check_tensors("feed-forward block", latents, ln_w, ln_b, w1, w2)
    dim, hidden = latents.shape[-1], w1.shape[0]
    if w1.shape != (hidden, dim) or w2.shape != (dim, hidden) or ln_w.shape != (dim,) or ln_b.shape != (dim,):
        raise KernelError(f"feed-forward shapes do not fit latents (..., {dim}): LayerNorm {tuple(ln_w.shape)}, "
                          f"Linear1 {tuple(w1.shape)}, Linear2 {tuple(w2.shape)}; "
                          f"want (dim,), (hidden, dim), (dim, hidden)")
    flat = latents.reshape(-1, dim).contiguous()
    h = _ln_linear_gelu(flat, ln_w, ln_b, w1, eps)
    return torch.addmm(flat, h, w2.t()).view(latents.shape)


def feed_forward_ref(latents: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, w1: torch.Tensor,
                     w2: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    # latents: (B, Q, dim) -> (B, Q, dim); plain PyTorch, same maths as engine.projector.feed_forward + residual
    h = F.gelu(F.layer_norm(latents, latents.shape[-1:], ln_w, ln_b, eps) @ w1.t())
    return latents + h @ w2.t()
