"""The Triton pieces the attention kernels share: the dot product, a program's Q tile, the online softmax over a
key range, and the block sizes and launch configuration.

`decoupled_attention` (forward), `decoupled_attention_bwd` (backward) and `packed_attention` (the TensorRT
plugin's kernel) are built from these; the projector kernels use `mma` and `dot_precision` for their dots.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ipadapter_instruct.kernels._runtime import interpreting


@triton.jit
def mma(a, b, PRECISION: tl.constexpr):
    # tl.dot, with the interpreter's broken bf16 dot replaced by an exact fp32 one on the same bf16 values
    if PRECISION == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


def dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "ieee"  # no TF32: fp32 callers asked for fp32
    return "upcast" if dtype == torch.bfloat16 and interpreting() else "tf32"


@triton.jit
def attend(q, k_base, v_base, stride_kn, stride_vn, start, end, mask_row, qk_scale, offs_d, d_ok,
           HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
           PRECISION: tl.constexpr):
    # online softmax of q (BLOCK_M, BLOCK_D) over keys [start, end): returns (unnormalised acc, max, sum), base 2
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
        s = mma(q, tl.trans(k), PRECISION) * qk_scale
        keep = n_ok
        if HAS_MASK:
            keep = keep & (tl.load(mask_row + offs_n, mask=n_ok, other=0) != 0)
        s = tl.where(keep[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet stays all zero
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def q_tile(Q, H, Lq, D, stride_qb, stride_qh, stride_qm, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # this program's (batch, head) and Q tile, shared by the forward and backward kernels
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    d_ok = offs_d < D
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    return pid_bh, b, h, offs_m, offs_d, m_ok, d_ok, q


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    """`t` when its last axis is contiguous (what the kernels' pointer arithmetic takes), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def key_block(n: int) -> int:
    """The key block (16, 32 or 64) that pads `n` keys least; ties go to the larger block."""
    return min((triton.cdiv(n, c) * c, -c) for c in (64, 32, 16))[1] * -1


# (BLOCK_M, num_warps) per padded head dim, read off ptxas at sm_90 (`python -m ipadapter_instruct.kernels.aot`, which compiles
# the SD1.5 launches with the JIT's own specialisation): the largest Q tile that compiles without register
# spills in fp16/bf16 (the d160 backward spills 4-8 B at 32 rows with 4 or 8 warps). fp32 tiles are halved.
_TILES = {16: (128, 4), 32: (128, 4), 64: (128, 8), 128: (64, 8), 256: (32, 4)}
_TILES_BWD = {16: (64, 4), 32: (64, 4), 64: (64, 8), 128: (64, 8), 256: (16, 4)}


def launch_config(d: int, lq: int, itemsize: int = 2, backward: bool = False) -> dict:
    block_d = max(16, triton.next_power_of_2(d))
    block_m, warps = (_TILES_BWD if backward else _TILES)[block_d]
    if itemsize == 4:
        block_m = max(16, block_m // 2)
    block_m = min(block_m, max(16, triton.next_power_of_2(lq)))
    return dict(BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps, num_stages=2)
