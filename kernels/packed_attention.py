"""The decoupled cross-attention as the TensorRT plugin runs it: packed (B, L, H*D) tensors, one adapter.

    out = softmax(q k^T / sqrt(D)) v  +  ip_scale[b] * softmax(q k_ip^T / sqrt(D)) v_ip

Same maths and the same inner loops (`q_tile`, `attend`: attention_blocks.py) as `decoupled_attention`, with
the calling convention an ahead-of-time TensorRT plugin needs: input pointers first (q, k, v, k_ip, v_ip,
ip_scale), then the int32 sizes TensorRT resolves from the shapes at run time (Lq, Lt, Li), then the output; the
head count, head size and softmax scale are compile-time constants of each variant. The tensors are
the ones an ONNX graph has right after the Q/K/V projections, (B, L, H*D) with no transposes either side.

`packed_attention` launches it from PyTorch (the plugin's JIT implementation and the tests);
`packed_attention_ref` is the plain reference with the same signature.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ipadapter_instruct.kernels.errors import KernelError

from ipadapter_instruct.kernels._runtime import triton_unusable
from ipadapter_instruct.kernels.attention_blocks import attend, dot_precision, key_block, launch_config, q_tile

DTYPES = (torch.float32, torch.float16)


@triton.jit
def _packed_fwd_kernel(Q, K, V, KI, VI, Scale, Lq, Lt, Li, Out,
                       HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, QK_SCALE: tl.constexpr,
                       PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr):
    row = HEADS * HEAD_DIM  # elements between consecutive tokens of one tensor
    pid_bh, b, h, offs_m, offs_d, m_ok, d_ok, q = q_tile(Q, HEADS, Lq, HEAD_DIM, Lq * row, HEAD_DIM, row,
                                                         BLOCK_M, BLOCK_D)
    acc, m_t, l_t = attend(q, K + b * Lt * row + h * HEAD_DIM, V + b * Lt * row + h * HEAD_DIM, row, row,
                           0, Lt, Scale, QK_SCALE, offs_d, d_ok, False, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    out = acc / tl.where(l_t > 0, l_t, 1.0)[:, None]
    acc_i, m_i, l_i = attend(q, KI + b * Li * row + h * HEAD_DIM, VI + b * Li * row + h * HEAD_DIM, row, row,
                             0, Li, Scale, QK_SCALE, offs_d, d_ok, False, BLOCK_M, BLOCK_I, BLOCK_D, PRECISION)
    w = tl.load(Scale + b) / tl.where(l_i > 0, l_i, 1.0)
    out += w[:, None] * acc_i
    tl.store(Out + b * Lq * row + h * HEAD_DIM + offs_m[:, None] * row + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def constexprs(dtype: torch.dtype, heads: int, head_dim: int, lt: int = 77, li: int = 16) -> dict:
    """The compile-time constants of one variant (the plugin compiles one per dtype and head size)."""
    cfg = launch_config(head_dim, 4096, dtype.itemsize)
    return dict(HEADS=heads, HEAD_DIM=head_dim, QK_SCALE=head_dim ** -0.5 * math.log2(math.e),
                PRECISION=dot_precision(dtype), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=key_block(lt),
                BLOCK_I=key_block(li), BLOCK_D=cfg["BLOCK_D"])


def num_warps(dtype: torch.dtype, head_dim: int) -> int:
    return launch_config(head_dim, 4096, dtype.itemsize)["num_warps"]


def _check(q, k, v, k_ip, v_ip, scale, heads):
    if q.ndim != 3:
        raise KernelError(f"q must be (B, Lq, H*D), got shape {tuple(q.shape)}")
    b, _, width = q.shape
    if heads < 1 or width % heads:
        raise KernelError(f"q's width {width} is not a multiple of heads={heads}")
    if q.dtype not in DTYPES:
        raise KernelError(f"q has dtype {q.dtype}; the plugin supports float32 and float16")
    for name, t in (("k", k), ("v", v), ("k_ip", k_ip), ("v_ip", v_ip)):
        if t.ndim != 3 or t.shape[0] != b or t.shape[2] != width or t.dtype != q.dtype:
            raise KernelError(f"{name} must be (B={b}, L, {width}) {q.dtype}, got {tuple(t.shape)} {t.dtype}")
    if k.shape != v.shape or k_ip.shape != v_ip.shape:
        raise KernelError(f"k/v and k_ip/v_ip must pair up, got {tuple(k.shape)}/{tuple(v.shape)} and "
                          f"{tuple(k_ip.shape)}/{tuple(v_ip.shape)}")
    if scale.shape != (b,) or not scale.is_floating_point():
        raise KernelError(f"ip_scale must be a float (B={b},) tensor, got {scale.dtype} {tuple(scale.shape)}")


def packed_attention_ref(q, k, v, k_ip, v_ip, scale, heads: int):
    """Plain PyTorch on (B, L, H*D) tensors; softmax in fp32; returns (B, Lq, H*D) in q's dtype."""
    _check(q, k, v, k_ip, v_ip, scale, heads)

    def attend(kk, vv):
        qh, kh, vh = (t.unflatten(-1, (heads, -1)).transpose(1, 2).float() for t in (q, kk, vv))
        p = torch.softmax(qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5, dim=-1)
        return p @ vh

    out = attend(k, v) + scale.float().view(-1, 1, 1, 1) * attend(k_ip, v_ip)
    return out.transpose(1, 2).flatten(2).to(q.dtype)


def packed_attention(q, k, v, k_ip, v_ip, scale, heads: int):
    """The plugin's kernel from PyTorch: same contract as `packed_attention_ref`."""
    _check(q, k, v, k_ip, v_ip, scale, heads)
    reason = triton_unusable(q.device)
    if reason:
        raise KernelError(f"the plugin's attention kernel cannot run here: {reason}")
    b, lq, width = q.shape
    d = width // heads
    q, k, v, k_ip, v_ip = (t.contiguous() for t in (q, k, v, k_ip, v_ip))
    out = torch.empty_like(q)
    const = constexprs(q.dtype, heads, d, k.shape[1], k_ip.shape[1])
    grid = (triton.cdiv(lq, const["BLOCK_M"]), b * heads)
    _packed_fwd_kernel[grid](q, k, v, k_ip, v_ip, scale.float().contiguous(), lq, k.shape[1], k_ip.shape[1], out,
                             num_warps=num_warps(q.dtype, d), num_stages=2, **const)
    return out
