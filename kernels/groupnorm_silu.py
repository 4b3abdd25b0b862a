"""GroupNorm followed by SiLU, fused: every resnet block of the SD UNet and VAE runs this pair twice.

PyTorch runs it as two kernels (GroupNorm reads x twice and writes y; SiLU reads y and writes again).
Here a statistics pass reads x once and writes a few numbers per (image, group, split), and an apply
pass reads x again and writes SiLU(GroupNorm(x)) once: one read and one write fewer. Each group's
elements are split across programs so a batch of 2 still fills the GPU; partial statistics are
(count, mean, M2) merged with Chan's formula (no sum-of-squares cancellation, no atomics, deterministic).
NCHW and channels-last inputs both work (the output keeps the input's memory format).
`group_norm_silu_ref` is the plain PyTorch reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ipadapter_instruct.kernels.errors import KernelError

from ipadapter_instruct.kernels._runtime import triton_unusable

BLOCK = 1024            # elements per step
SPLIT_ELEMENTS = 4096   # one split (program) per this many elements of a group, at most MAX_SPLIT
MAX_SPLIT = 64


@triton.jit
def _load(X, S, base, shift_row, e0, end, HW, CG, stride_c, stride_p, CHANNELS_LAST: tl.constexpr,
          HAS_SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    # one block of a group's elements, in memory order for either layout -> (x + shift in fp32, channel, offset, ok)
    e = e0 + tl.arange(0, BLOCK)
    ok = e < end
    if CHANNELS_LAST:
        p = e // CG
        c = e % CG
    else:
        c = e // HW
        p = e % HW
    off = c * stride_c + p * stride_p
    x = tl.load(X + base + off, mask=ok, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        x += tl.load(S + shift_row + c, mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok, x, 0.0), c, off, ok


@triton.jit
def _gn_silu_kernel(X, Y, W, B, S, Part, HW, C, G, CG, numel, chunk, stride_n, stride_c, stride_p, eps,
                    SPLIT: tl.constexpr, APPLY: tl.constexpr, SILU: tl.constexpr, HAS_SHIFT: tl.constexpr,
                    CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    # X, Y: (N, C, HW) by strides; S: (N, C) shift added first; Part: (N*G, SPLIT, 3) fp32 (count, mean, M2)
    ng = tl.program_id(0)
    split = tl.program_id(1)
    n = ng // G
    g = ng % G
    base = n.to(tl.int64) * stride_n + (g * CG).to(tl.int64) * stride_c
    start = split * chunk
    end = tl.minimum(start + chunk, numel)
    part = Part + ng * SPLIT * 3
    shift_row = n * C + g * CG
    if not APPLY:
        cnt = 0.0
        mean = 0.0
        m2 = 0.0
        for e0 in range(start, end, BLOCK):
            x, c, off, ok = _load(X, S, base, shift_row, e0, end, HW, CG, stride_c, stride_p, CHANNELS_LAST,
                                  HAS_SHIFT, BLOCK)
            nb = tl.sum(ok.to(tl.float32), 0)
            mb = tl.sum(x, 0) / nb
            m2b = tl.sum(tl.where(ok, (x - mb) * (x - mb), 0.0), 0)
            tot = cnt + nb
            delta = mb - mean
            mean = mean + delta * nb / tot
            m2 = m2 + m2b + delta * delta * cnt * nb / tot
            cnt = tot
        tl.store(part + split * 3, cnt)
        tl.store(part + split * 3 + 1, mean)
        tl.store(part + split * 3 + 2, m2)
    else:
        s = tl.arange(0, SPLIT)
        cnts = tl.load(part + s * 3)
        means = tl.load(part + s * 3 + 1)
        m2s = tl.load(part + s * 3 + 2)
        total = tl.sum(cnts, 0)
        mean = tl.sum(cnts * means, 0) / total
        m2 = tl.sum(m2s + cnts * (means - mean) * (means - mean), 0)
        rstd = 1.0 / tl.sqrt(m2 / total + eps)
        for e0 in range(start, end, BLOCK):
            x, c, off, ok = _load(X, S, base, shift_row, e0, end, HW, CG, stride_c, stride_p, CHANNELS_LAST,
                                  HAS_SHIFT, BLOCK)
            w = tl.load(W + g * CG + c, mask=ok, other=0.0).to(tl.float32)
            b = tl.load(B + g * CG + c, mask=ok, other=0.0).to(tl.float32)
            y = (x - mean) * rstd * w + b
            if SILU:
                y = y * tl.sigmoid(y)
            tl.store(Y + base + off, y.to(Y.dtype.element_ty), mask=ok)


def group_norm_silu_ref(x, weight, bias, groups: int, eps: float = 1e-5, silu: bool = True, shift=None):
    # x: (N, C, H, W); shift: (N, C) or None -> same shape and dtype; as torch computes it in x's dtype
    if shift is not None:
        x = x + shift[:, :, None, None]
    y = F.group_norm(x, groups, weight, bias, eps)
    return F.silu(y) if silu else y


def group_norm_silu(x, weight, bias, groups: int, eps: float = 1e-5, silu: bool = True, shift=None):
    """SiLU(GroupNorm(x + shift)) (GroupNorm alone with silu=False; shift per image and channel, e.g. the
    resnet's time embedding) in two passes; statistics in fp32."""
    # x: (N, C, H, W), NCHW or channels-last; weight, bias: (C,); shift: (N, C) -> (N, C, H, W), x's format
    if x.ndim != 4 or x.shape[1] % groups or weight.shape != (x.shape[1],) or bias.shape != (x.shape[1],):
        raise KernelError(f"group_norm_silu needs x (N, C, H, W) with C divisible by {groups} groups and (C,) "
                          f"weight/bias, got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if shift is not None and tuple(shift.shape) != tuple(x.shape[:2]):
        raise KernelError(f"group_norm_silu shift must be (N, C) = {tuple(x.shape[:2])}, got {tuple(shift.shape)}")
    reason = triton_unusable(x.device)
    if reason:
        raise KernelError(f"the triton GroupNorm+SiLU kernel cannot run here: {reason}")
    return _group_norm_silu(x, weight, bias, groups, eps, silu, shift)


def _group_norm_silu(x, weight, bias, groups, eps, silu, shift):
    # the launches on checked arguments (kernels.aot compiles them from here)
    n, c, h, w = x.shape
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if not channels_last and not x.is_contiguous():
        x = x.contiguous()
    y = torch.empty_like(x)
    cg, hw = c // groups, h * w
    numel = cg * hw
    split = min(MAX_SPLIT, triton.next_power_of_2(triton.cdiv(numel, SPLIT_ELEMENTS)))
    chunk = triton.cdiv(triton.cdiv(numel, split), BLOCK) * BLOCK
    part = torch.empty(n * groups, split, 3, device=x.device, dtype=torch.float32)  # every split writes its own
    stride_p = x.stride(3)  # pixels are consecutive along W in both layouts (H*W flattened)
    for apply in (False, True):
        _gn_silu_kernel[(n * groups, split)](
            x, y, weight, bias, part if shift is None else shift.contiguous(), part, hw, c, groups, cg, numel, chunk,
            x.stride(0), x.stride(1), stride_p, eps,
            SPLIT=split, APPLY=apply, SILU=silu, HAS_SHIFT=shift is not None, CHANNELS_LAST=channels_last,
            BLOCK=BLOCK, num_warps=4)
    return y
