"""Backward of the decoupled cross-attention: dq, dk, dv, dk_ip, dv_ip (the trainer's path).

The output is a weighted sum of independent softmax attentions (weight 1 for the text branch,
scale * ip_mask for each adapter), so the backward is one flash-attention style backward per branch
with the incoming gradient multiplied by that branch's weight. One kernel serves every branch: a
program owns a Q tile, recomputes the probabilities from the log-sum-exp the forward saved, gets
delta = rowsum(P * dP) in a first pass over the (short: Lt <= 320, Li <= 64) keys, then accumulates dq
in registers and adds its share of dk and dv into fp32 buffers atomically. dq is accumulated across
branches in one fp32 buffer. Not bitwise deterministic (atomic order); within fp32 rounding.
`backward` launches it per branch; `decoupled_attention.DecoupledAttentionFn` calls it for autograd.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ipadapter_instruct.kernels.attention_blocks import dot_precision, key_block, launch_config, mma, q_tile, unit_stride


@triton.jit
def _probs(q, do, lse, k_base, v_base, mask_row, n0, L, stride_kn, stride_vn, qk_scale, offs_d, d_ok,
           HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    # keys [n0, n0 + BLOCK_N): probabilities P recomputed from the saved log-sum-exp, and dP = dO V^T
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < L
    nd_ok = n_ok[:, None] & d_ok[None, :]
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=nd_ok, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=nd_ok, other=0.0)
    keep = n_ok
    if HAS_MASK:
        keep = keep & (tl.load(mask_row + offs_n, mask=n_ok, other=0) != 0)
    s = tl.where(keep[None, :], mma(q, tl.trans(k), PRECISION) * qk_scale, float("-inf"))
    p = tl.math.exp2(s - lse[:, None])
    return offs_n, nd_ok, k, p, mma(do, tl.trans(v), PRECISION)


@triton.jit
def _bwd_kernel(Q, K, V, DO, DQ, DK, DV, Lse, Mask, Scale, IpMask,
                qk_scale, sm_scale, H, Lq, L, D,
                stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                HAS_MASK: tl.constexpr, WEIGHTED: tl.constexpr, HAS_IP_MASK: tl.constexpr,
                ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_bh, b, h, offs_m, offs_d, m_ok, d_ok, q = q_tile(Q, H, Lq, D, stride_qb, stride_qh, stride_qm,
                                                         BLOCK_M, BLOCK_D)
    md_ok = m_ok[:, None] & d_ok[None, :]
    do = tl.load(DO + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                 mask=md_ok, other=0.0).to(tl.float32)
    if WEIGHTED:
        w = tl.load(Scale + b) + tl.zeros((BLOCK_M,), tl.float32)
        if HAS_IP_MASK:
            w = w * tl.load(IpMask + b * Lq + offs_m, mask=m_ok, other=0.0)
        do = do * w[:, None]
    do = do.to(q.dtype)
    lse = tl.load(Lse + pid_bh * Lq + offs_m, mask=m_ok, other=float("inf"))
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    grad_off = pid_bh * L * D  # dk, dv buffers are contiguous (B, H, L, D) fp32

    delta = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, L, BLOCK_N):
        offs_n, nd_ok, k, p, dp = _probs(q, do, lse, k_base, v_base, Mask + b * L, n0, L, stride_kn, stride_vn,
                                         qk_scale, offs_d, d_ok, HAS_MASK, BLOCK_N, PRECISION)
        delta += tl.sum(p * dp, 1)

    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(0, L, BLOCK_N):
        offs_n, nd_ok, k, p, dp = _probs(q, do, lse, k_base, v_base, Mask + b * L, n0, L, stride_kn, stride_vn,
                                         qk_scale, offs_d, d_ok, HAS_MASK, BLOCK_N, PRECISION)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dq += mma(ds, k, PRECISION)
        dk = mma(tl.trans(ds), q, PRECISION) * sm_scale
        dv = mma(tl.trans(p.to(q.dtype)), do, PRECISION)
        ptrs = grad_off + offs_n[:, None] * D + offs_d[None, :]
        tl.atomic_add(DK + ptrs, dk, mask=nd_ok)
        tl.atomic_add(DV + ptrs, dv, mask=nd_ok)

    dq = dq * sm_scale
    dq_ptrs = DQ + pid_bh * Lq * D + offs_m[:, None] * D + offs_d[None, :]
    if ACCUMULATE:
        dq += tl.load(dq_ptrs, mask=md_ok, other=0.0)
    tl.store(dq_ptrs, dq, mask=md_ok)


def _branch_backward(q, k, v, dout, dq, lse, mask, scale, ip_mask, accumulate):
    # q, dout: (B, H, Lq, D); k, v: (B, H, L, D); dq: fp32 (B, H, Lq, D) -> dk, dv fp32 (B, H, L, D)
    b, h, lq, d = q.shape
    n = k.shape[2]
    k, v = unit_stride(k), unit_stride(v)
    dk = torch.zeros(b, h, n, d, device=q.device, dtype=torch.float32)
    dv = torch.zeros_like(dk)
    cfg = launch_config(d, lq, q.element_size(), backward=True)
    dummy = lse
    _bwd_kernel[(triton.cdiv(lq, cfg["BLOCK_M"]), b * h)](
        q, k, v, dout, dq, dk, dv, lse,
        mask.to(torch.int8).contiguous() if mask is not None else dummy,
        scale.contiguous() if scale is not None else dummy,
        ip_mask.float().contiguous() if ip_mask is not None else dummy,
        d ** -0.5 * math.log2(math.e), d ** -0.5, h, lq, n, d,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        HAS_MASK=mask is not None, WEIGHTED=scale is not None, HAS_IP_MASK=ip_mask is not None,
        ACCUMULATE=accumulate, PRECISION=dot_precision(q.dtype),
        BLOCK_N=key_block(n), **cfg)
    return dk, dv


def backward(q, k, v, k_ips, v_ips, dout, lse_t, lse_i, scales, mask, ip_masks):
    """Gradients of the fused forward from the log-sum-exps it saved: (dq, dk, dv, *dk_ips, *dv_ips) in q's dtype.

    Arguments as `decoupled_attention.forward` takes them (normalised), plus dout (B, H, Lq, D) and lse_t
    (B, H, Lq), lse_i (A, B, H, Lq) from the forward.
    """
    q, dout = unit_stride(q), unit_stride(dout)
    dq = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    dk, dv = _branch_backward(q, k, v, dout, dq, lse_t, mask, None, None, accumulate=False)
    grads_k, grads_v = [], []
    for a in range(len(k_ips)):
        ipm = ip_masks[a] if ip_masks is not None else None
        dki, dvi = _branch_backward(q, k_ips[a], v_ips[a], dout, dq, lse_i[a], None, scales[a], ipm, accumulate=True)
        grads_k.append(dki.to(q.dtype))
        grads_v.append(dvi.to(q.dtype))
    return (dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), *grads_k, *grads_v)
