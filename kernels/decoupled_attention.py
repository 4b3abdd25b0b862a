"""Decoupled cross-attention (IP-Adapter): text attention plus scaled adapter attention, one kernel.

    out = softmax(q k^T / sqrt(D)) v  +  sum_a scale_a * ip_mask_a * softmax(q k_ip_a^T / sqrt(D)) v_ip_a

Two (or more) separate softmaxes, as SPEC.md section 1. The kernel takes one Q tile per program, runs
an online softmax over the text keys and then over each adapter's keys while the Q tile stays in
registers, and writes the output once, already in the (B, Lq, H, D) layout the attention's output
projection wants. `decoupled_attention_ref` is the plain PyTorch reference with the same signature.
The backward pass lives in `decoupled_attention_bwd.py`; `DecoupledAttentionFn` here joins the two for
autograd. The Triton pieces both kernels are built from are in `attention_blocks.py`.
"""
from __future__ import annotations

import itertools
import math

import torch
import triton
import triton.language as tl

from ipadapter_instruct.kernels.errors import KernelError

from ipadapter_instruct.kernels._runtime import triton_unusable
from ipadapter_instruct.kernels.attention_blocks import attend, dot_precision, key_block, launch_config, q_tile, unit_stride
from ipadapter_instruct.kernels.decoupled_attention_bwd import backward

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def normalize(q, k, v, k_ip, v_ip, scale, mask, ip_mask):
    """Check the contract and return (k_ips, v_ips, scales (A, B) fp32, ip_masks list or None).

    A single adapter may be given as tensors, several as tuples of tensors (and tuples of scales and
    ip_masks). Every problem is one KernelError naming the argument and the expected shape.
    """
    if q.ndim != 4:
        raise KernelError(f"q must be (B, H, Lq, D), got shape {tuple(q.shape)}")
    b, h, lq, d = q.shape
    if q.dtype not in DTYPES:
        raise KernelError(f"q has dtype {q.dtype}; supported: float32, float16, bfloat16")
    for name, t in (("k", k), ("v", v)):
        if t.ndim != 4 or t.shape[:2] != (b, h) or t.shape[3] != d or t.dtype != q.dtype:
            raise KernelError(f"{name} must be (B={b}, H={h}, Lt, D={d}) {q.dtype}, got {tuple(t.shape)} {t.dtype}")
    if k.shape != v.shape:
        raise KernelError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    several = isinstance(k_ip, (tuple, list))
    k_ips = list(k_ip) if several else ([] if k_ip is None else [k_ip])
    v_ips = list(v_ip) if isinstance(v_ip, (tuple, list)) else ([] if v_ip is None else [v_ip])
    if len(k_ips) != len(v_ips):
        raise KernelError(f"got {len(k_ips)} k_ip tensors but {len(v_ips)} v_ip tensors")
    for i, (ki, vi) in enumerate(zip(k_ips, v_ips)):
        if ki.ndim != 4 or ki.shape[:2] != (b, h) or ki.shape[3] != d or ki.dtype != q.dtype or ki.shape != vi.shape \
                or vi.dtype != q.dtype:
            raise KernelError(f"adapter {i}: k_ip and v_ip must both be (B={b}, H={h}, Li, D={d}) {q.dtype}, "
                              f"got {tuple(ki.shape)} {ki.dtype} and {tuple(vi.shape)} {vi.dtype}")
    n = len(k_ips)
    scale_list = list(scale) if isinstance(scale, (tuple, list)) else [scale] * (n or 1)
    if n and len(scale_list) != n:
        raise KernelError(f"got {n} adapters but {len(scale_list)} scales")
    rows = []
    for s in scale_list[:n]:
        if isinstance(s, torch.Tensor):
            if s.shape not in ((b,), ()):
                raise KernelError(f"scale must be a float or a (B={b},) tensor, got shape {tuple(s.shape)}")
            s = s.to(device=q.device, dtype=torch.float32)
            rows.append(s if s.ndim == 1 else s.expand(b))  # (B,) as given: keeps B symbolic when traced
        elif isinstance(s, (int, float)) and not isinstance(s, bool):
            rows.append(torch.full((b,), float(s), device=q.device))
        else:
            raise KernelError(f"scale must be a float or a (B,) tensor, got {type(s).__name__}")
    if len(rows) == 1:  # the usual case: a view, no copy per call
        scales = rows[0][None]
    else:
        scales = torch.stack(rows) if rows else torch.zeros(0, b, device=q.device)
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (b, k.shape[2])):
        raise KernelError(f"mask must be bool (B={b}, Lt={k.shape[2]}) with True = keep, "
                          f"got {mask.dtype} {tuple(mask.shape)}")
    ip_masks = None
    if ip_mask is not None:
        ip_masks = list(ip_mask) if isinstance(ip_mask, (tuple, list)) else [ip_mask]
        if len(ip_masks) != n:
            raise KernelError(f"got {n} adapters but {len(ip_masks)} ip_masks")
        for m in ip_masks:
            if tuple(m.shape) != (b, lq) or not m.is_floating_point():
                raise KernelError(f"ip_mask must be float (B={b}, Lq={lq}), got {m.dtype} {tuple(m.shape)}")
    return k_ips, v_ips, scales, ip_masks


def _softmax_attention(q, k, v, mask=None):
    # q: (B, H, Lq, D); k, v: (B, H, L, D); mask: (B, L) bool -> (B, H, Lq, D); rows with no key left give 0
    s = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p.to(v.dtype) @ v


def decoupled_attention_ref(q, k, v, k_ip, v_ip, scale, mask=None, ip_mask=None):
    """Plain PyTorch, in the inputs' dtype (softmax in fp32). Same contract as `decoupled_attention`."""
    k_ips, v_ips, scales, ip_masks = normalize(q, k, v, k_ip, v_ip, scale, mask, ip_mask)
    out = _softmax_attention(q, k, v, mask)
    for a, (ki, vi) in enumerate(zip(k_ips, v_ips)):
        w = scales[a].view(-1, 1, 1, 1)
        if ip_masks is not None:
            w = w * ip_masks[a].float()[:, None, :, None]
        out = out + w.to(q.dtype) * _softmax_attention(q, ki, vi)
    return out.to(q.dtype)


@triton.jit
def _fwd_kernel(Q, K, V, KI, VI, Out, Mask, Scale, IpMask, Offs, LseT, LseI,
                qk_scale, B, H, Lq, Lt, D,
                stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_kib, stride_kih, stride_kin,
                stride_vib, stride_vih, stride_vin, stride_ob, stride_oh, stride_om,
                NUM_ADAPTERS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_IP_MASK: tl.constexpr,
                STORE_LSE: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_bh, b, h, offs_m, offs_d, m_ok, d_ok, q = q_tile(Q, H, Lq, D, stride_qb, stride_qh, stride_qm,
                                                         BLOCK_M, BLOCK_D)

    acc, m_i, l_i = attend(q, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
                           stride_kn, stride_vn, 0, Lt, Mask + b * Lt, qk_scale, offs_d, d_ok,
                           HAS_MASK, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if STORE_LSE:
        tl.store(LseT + pid_bh * Lq + offs_m, tl.where(l_i > 0, m_i + tl.math.log2(l_i), float("inf")), mask=m_ok)

    for a in tl.static_range(NUM_ADAPTERS):
        start = tl.load(Offs + a)
        end = tl.load(Offs + a + 1)
        acc_a, m_a, l_a = attend(q, KI + b * stride_kib + h * stride_kih, VI + b * stride_vib + h * stride_vih,
                                 stride_kin, stride_vin, start, end, Mask, qk_scale, offs_d, d_ok,
                                 False, BLOCK_M, BLOCK_I, BLOCK_D, PRECISION)
        w = tl.load(Scale + a * B + b) / tl.where(l_a > 0, l_a, 1.0)
        if HAS_IP_MASK:
            w = w * tl.load(IpMask + (a * B + b) * Lq + offs_m, mask=m_ok, other=0.0)
        out += w[:, None] * acc_a
        if STORE_LSE:
            tl.store(LseI + (a * B * H + pid_bh) * Lq + offs_m,
                     tl.where(l_a > 0, m_a + tl.math.log2(l_a), float("inf")), mask=m_ok)

    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


_OFFSETS: dict = {}


def _offsets(lens: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # adapter token offsets, made once per (lengths, device): a fresh host-to-device copy on every call
    # would stall the CUDA stream (and cannot be captured in a CUDA graph)
    key = (lens, device)
    if key not in _OFFSETS:
        _OFFSETS[key] = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)
    return _OFFSETS[key]


def forward(q, k, v, k_ips, v_ips, scales, mask, ip_masks, store_lse=False):
    """Launch the fused forward on normalised arguments. Returns (out, lse_text, lse_ip) in base 2."""
    # q: (B, H, Lq, D) -> out: (B, H, Lq, D), a view of a (B, Lq, H, D) buffer
    b, h, lq, d = q.shape
    lt = k.shape[2]
    q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)
    n = len(k_ips)
    if n == 1:
        ki, vi = unit_stride(k_ips[0]), unit_stride(v_ips[0])
    elif n > 1:
        ki, vi = torch.cat(k_ips, dim=2), torch.cat(v_ips, dim=2)
    else:
        ki, vi = k, v  # unused
    lens = tuple(t.shape[2] for t in k_ips)
    offs = _offsets(lens, q.device)
    out = torch.empty(b, lq, h, d, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse_t = torch.empty(b, h, lq, device=q.device, dtype=torch.float32) if store_lse else out
    lse_i = torch.empty(max(n, 1), b, h, lq, device=q.device, dtype=torch.float32) if store_lse else out
    mask_arg = mask.to(torch.int8).contiguous() if mask is not None else offs
    ipm = torch.stack([m.float() for m in ip_masks]).contiguous() if ip_masks is not None else offs
    cfg = launch_config(d, lq, q.element_size())
    grid = (triton.cdiv(lq, cfg["BLOCK_M"]), b * h)
    _fwd_kernel[grid](
        q, k, v, ki, vi, out, mask_arg, scales.contiguous(), ipm, offs, lse_t, lse_i,
        d ** -0.5 * math.log2(math.e), b, h, lq, lt, d,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), ki.stride(0), ki.stride(1), ki.stride(2),
        vi.stride(0), vi.stride(1), vi.stride(2), out.stride(0), out.stride(1), out.stride(2),
        NUM_ADAPTERS=n, HAS_MASK=mask is not None, HAS_IP_MASK=ip_masks is not None, STORE_LSE=store_lse,
        PRECISION=dot_precision(q.dtype),
        BLOCK_N=key_block(lt), BLOCK_I=key_block(max(lens, default=16)), **cfg)
    return out, (lse_t if store_lse else None), (lse_i if store_lse else None)


class DecoupledAttentionFn(torch.autograd.Function):
    """The fused forward saving each branch's log-sum-exp, and the backward of `decoupled_attention_bwd`."""

    @staticmethod
    def forward(ctx, n, scales, mask, ip_masks, q, k, v, *ips):
        k_ips, v_ips = list(ips[:n]), list(ips[n:])
        out, lse_t, lse_i = forward(q, k, v, k_ips, v_ips, scales, mask, ip_masks, store_lse=True)
        ctx.save_for_backward(q, k, v, *ips, lse_t, lse_i, scales)
        ctx.n, ctx.mask, ctx.ip_masks = n, mask, ip_masks
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, *rest = ctx.saved_tensors
        n = ctx.n
        k_ips, v_ips, (lse_t, lse_i, scales) = rest[:n], rest[n:2 * n], rest[2 * n:]
        grads = backward(q, k, v, k_ips, v_ips, dout, lse_t, lse_i, scales, ctx.mask, ctx.ip_masks)
        return (None, None, None, None, *grads)


def decoupled_attention(q, k, v, k_ip, v_ip, scale, mask=None, ip_mask=None):
    """softmax(q k^T/sqrt(D)) v + sum_a scale_a * ip_mask_a * softmax(q k_ip_a^T/sqrt(D)) v_ip_a, fused.

    q: (B, H, Lq, D); k, v: (B, H, Lt, D); k_ip, v_ip: (B, H, Li, D) or tuples of them (several adapters);
    scale: float or (B,) tensor (a tuple of those for several adapters); mask: bool (B, Lt), True = keep;
    ip_mask: float (B, Lq) per adapter. Returns (B, H, Lq, D) in q's dtype. Differentiable in q, k, v,
    k_ip and v_ip (not in scale or ip_mask).
    """
    k_ips, v_ips, scales, ip_masks = normalize(q, k, v, k_ip, v_ip, scale, mask, ip_mask)
    reason = triton_unusable(q.device)
    if reason:
        raise KernelError(f"the triton decoupled-attention kernel cannot run here: {reason}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise KernelError(f"head dim {q.shape[-1]} is over the kernel's limit of {MAX_HEAD_DIM}")
    for name, t in (("scale", scale), ("ip_mask", ip_mask)):
        items = t if isinstance(t, (tuple, list)) else [t]
        if any(isinstance(x, torch.Tensor) and x.requires_grad for x in items):
            raise KernelError(f"the kernel gives no gradient for {name}; use decoupled_attention_ref for that")
    tensors = [q, k, v, *k_ips, *v_ips]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return DecoupledAttentionFn.apply(len(k_ips), scales, mask, ip_masks, *tensors)
    return forward(q, k, v, k_ips, v_ips, scales, mask, ip_masks)[0]
