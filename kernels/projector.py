"""Fused instruct projector: the Perceiver attention block in one Triton launch, and the whole projector.

One program per (batch row, head) normalises the latents (norm2) while projecting them to q, then walks
the context tokens in blocks: each block is normalised (norm1) while it is projected to k and v by one
GEMM against that head's rows of `to_kv` (K rows h*d.., V rows inner + h*d..), and folded into an online
softmax of (q d^-1/4)(k d^-1/4)^T; the latents' own tokens (the second half of the concat) are the last
block. Neither the normalised tensors nor the concat reach memory; scores and accumulators are fp32.
`to_out` and the residual are one `torch.addmm` on the heads' output.

`projector_forward` runs an `engine.projector.InstructProjector` (IP-Adapter+ or IPAdapter-Instruct)
with this block and the fused FF block of `kernels.projector_ff`, reading the module's own parameters.
`perceiver_attention_ref` is the plain PyTorch reference with the same signature as `perceiver_attention`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ipadapter_instruct.kernels.errors import KernelError

from ipadapter_instruct.kernels.attention_blocks import dot_precision, mma
from ipadapter_instruct.kernels.projector_ff import check_tensors, feed_forward, ln_matmul, row_stats

BLOCK_N = 32    # context tokens per step
BLOCK_K = 64    # model-width chunk per GEMM step
NUM_WARPS = 8   # 183 registers at 8 warps against 254 at 4, no spills either way (python -m ipadapter_instruct.kernels.aot, sm_90)


@triton.jit
def _attend(q, kv, kmask, m_i, l_i, acc, qk_scale, BLOCK_T: tl.constexpr, DIM_HEAD: tl.constexpr,
            PRECISION: tl.constexpr):
    # q: (BLOCK_Q, D) pre-scaled; kv: (BLOCK_T, 2D) fp32 [k | v]; kmask: (BLOCK_T,) -> updated m_i, l_i, acc
    k, v = tl.split(tl.permute(tl.reshape(kv, (BLOCK_T, 2, DIM_HEAD)), (0, 2, 1)))
    k = (k * qk_scale).to(q.dtype)
    s = mma(q, tl.trans(k), PRECISION) * 1.4426950408889634  # log2(e): softmax with exp2
    s = tl.where(kmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + mma(p.to(q.dtype), v.to(q.dtype), PRECISION)
    return m_new, l_i, acc


@triton.jit
def _perceiver_attention_kernel(X, LAT, OUT, N1_W, N1_B, N2_W, N2_B, WQ, WKV,
                                stride_xb, stride_xn, stride_lb, stride_lq, stride_ob, stride_oq,
                                N, Q, DIM, eps, qk_scale,
                                HEADS: tl.constexpr, DIM_HEAD: tl.constexpr, BLOCK_Q: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    # X: (B, N, DIM); LAT: (B, Q, DIM); WQ: (HEADS*D, DIM); WKV: (2*HEADS*D, DIM) -> OUT: (B, Q, HEADS*D)
    head = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    X += batch * stride_xb
    LAT += batch * stride_lb
    OUT += batch * stride_ob
    d = tl.arange(0, DIM_HEAD)
    c = tl.arange(0, 2 * DIM_HEAD)
    kv_rows = head * DIM_HEAD + c % DIM_HEAD + (c // DIM_HEAD) * (HEADS * DIM_HEAD)
    kv_ok = c < 2 * DIM_HEAD
    qrows = tl.arange(0, BLOCK_Q)
    qmask = qrows < Q

    mean2, rstd2 = row_stats(LAT, qrows, qmask, stride_lq, DIM, eps, BLOCK_Q, BLOCK_K)
    q = ln_matmul(LAT, qrows, qmask, stride_lq, mean2, rstd2, N2_W, N2_B, WQ, head * DIM_HEAD + d, d < DIM_HEAD,
                  DIM, BLOCK_Q, DIM_HEAD, BLOCK_K, PRECISION)
    q = (q * qk_scale).to(LAT.dtype.element_ty)

    m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, DIM_HEAD], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        rmask = rows < N
        mean1, rstd1 = row_stats(X, rows, rmask, stride_xn, DIM, eps, BLOCK_N, BLOCK_K)
        kv = ln_matmul(X, rows, rmask, stride_xn, mean1, rstd1, N1_W, N1_B, WKV, kv_rows, kv_ok, DIM,
                       BLOCK_N, 2 * DIM_HEAD, BLOCK_K, PRECISION)
        m_i, l_i, acc = _attend(q, kv, rmask, m_i, l_i, acc, qk_scale, BLOCK_N, DIM_HEAD, PRECISION)
    kv_own = ln_matmul(LAT, qrows, qmask, stride_lq, mean2, rstd2, N2_W, N2_B, WKV, kv_rows, kv_ok, DIM,
                       BLOCK_Q, 2 * DIM_HEAD, BLOCK_K, PRECISION)  # the latents' own tokens close the concat
    m_i, l_i, acc = _attend(q, kv_own, qmask, m_i, l_i, acc, qk_scale, BLOCK_Q, DIM_HEAD, PRECISION)

    out = acc / l_i[:, None]
    tl.store(OUT + qrows[:, None] * stride_oq + (head * DIM_HEAD + d)[None, :], out.to(OUT.dtype.element_ty),
             mask=qmask[:, None])


def _attention_heads(x, latents, norm1_w, norm1_b, norm2_w, norm2_b, wq, wkv, heads, eps):
    # x: (B, N, dim); latents: (B, Q, dim); wq: (heads*d, dim); wkv: (2*heads*d, dim) -> (B, Q, heads*d)
    b, n, dim = x.shape
    nq = latents.shape[1]
    inner = wq.shape[0]
    dim_head = inner // heads
    norms = (norm1_w.shape, norm1_b.shape, norm2_w.shape, norm2_b.shape)
    if (heads * dim_head != inner or wkv.shape != (2 * inner, dim) or latents.shape != (b, nq, dim)
            or any(s != (dim,) for s in norms)):
        raise KernelError(f"Perceiver attention shapes do not fit: x {tuple(x.shape)}, latents {tuple(latents.shape)}, "
                          f"to_q {tuple(wq.shape)}, to_kv {tuple(wkv.shape)}, {heads} heads, norms "
                          f"{[tuple(s) for s in norms]}; want to_q (H*d, dim), to_kv (2*H*d, dim), norms (dim,)")
    if dim_head < 16 or dim_head & (dim_head - 1):
        raise KernelError(f"the fused Perceiver attention needs a power-of-two head size >= 16, got {dim_head}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if latents.stride(-1) != 1:
        latents = latents.contiguous()
    out = torch.empty(b, nq, inner, device=x.device, dtype=x.dtype)
    _perceiver_attention_kernel[(heads, b)](
        x, latents, out, norm1_w, norm1_b, norm2_w, norm2_b, wq.contiguous(), wkv.contiguous(),
        x.stride(0), x.stride(1), latents.stride(0), latents.stride(1), out.stride(0), out.stride(1),
        n, nq, dim, eps, dim_head ** -0.25,
        HEADS=heads, DIM_HEAD=dim_head, BLOCK_Q=max(16, triton.next_power_of_2(nq)), BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K, PRECISION=dot_precision(x.dtype), num_warps=NUM_WARPS)
    return out


def perceiver_attention(x, latents, norm1_w, norm1_b, norm2_w, norm2_b, wq, wkv, wout, heads, eps=1e-5):
    """latents + to_out(Attn(to_q(norm2(latents)), to_kv(concat(norm1(x), norm2(latents))))), fused."""
    # x: (B, N, dim); latents: (B, Q, dim); norm*: (dim,); wq: (heads*d, dim); wkv: (2*heads*d, dim);
    # wout: (dim, heads*d) -> (B, Q, dim)
    check_tensors("Perceiver attention", x, latents, norm1_w, norm1_b, norm2_w, norm2_b, wq, wkv, wout)
    heads_out = _attention_heads(x, latents, norm1_w, norm1_b, norm2_w, norm2_b, wq, wkv, heads, eps)
    dim = latents.shape[-1]
    out = torch.addmm(latents.reshape(-1, dim), heads_out.view(-1, heads_out.shape[-1]), wout.t())
    return out.view(latents.shape)


def perceiver_attention_ref(x, latents, norm1_w, norm1_b, norm2_w, norm2_b, wq, wkv, wout, heads, eps=1e-5):
    # x: (B, N, dim); latents: (B, Q, dim) -> (B, Q, dim); plain PyTorch, the maths of PerceiverAttention + residual
    dim = latents.shape[-1]
    xn = F.layer_norm(x, (dim,), norm1_w, norm1_b, eps)
    ln = F.layer_norm(latents, (dim,), norm2_w, norm2_b, eps)
    q = ln @ wq.t()
    k, v = (torch.cat([xn, ln], dim=1) @ wkv.t()).chunk(2, dim=-1)
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    s = q.shape[-1] ** -0.25
    w = torch.softmax(((q * s) @ (k * s).transpose(-2, -1)).float(), dim=-1).to(q.dtype)
    return latents + (w @ v).transpose(1, 2).flatten(2) @ wout.t()


def _attention_block(attn, x, latents):
    # attn: engine.projector.PerceiverAttention; x: (B, N, dim); latents: (B, Q, dim) -> (B, Q, dim)
    return perceiver_attention(x, latents, attn.norm1.weight, attn.norm1.bias, attn.norm2.weight, attn.norm2.bias,
                               attn.to_q.weight, attn.to_kv.weight, attn.to_out.weight, attn.heads, attn.norm1.eps)


def _ff_block(ff, latents):
    # ff: engine.projector.feed_forward Sequential (LayerNorm, Linear, GELU, Linear); latents: (B, Q, dim)
    return feed_forward(latents, ff[0].weight, ff[0].bias, ff[1].weight, ff[3].weight, ff[0].eps)


@torch.no_grad()
def projector_forward(module, image, instruct=None, prompt=None):
    """What `module(image, instruct, prompt)` returns, with the fused attention and FF blocks (inference only)."""
    # module: engine.projector.InstructProjector; image: (B, Ni, image_dim); instruct, prompt: (B, Lt, text_dim)
    # -> (B, num_queries, output_dim)
    check_tensors("instruct projector", image, module.latents)
    x = F.linear(image, module.proj_in.weight, module.proj_in.bias)
    paths = [(x, module.layers)]
    if module.config.is_instruct:
        if instruct is None or prompt is None:
            raise KernelError("an IPAdapter-Instruct projector needs instruction and prompt tokens")
        paths.append((F.linear(prompt, module.proj_prompt_input.weight, module.proj_prompt_input.bias),
                      module.prompt_layers))
        paths.append((F.linear(instruct, module.proj_new_input.weight, module.proj_new_input.bias),
                      module.new_input_layers))
    latents = module.latents.expand(x.shape[0], -1, -1)
    for i in range(module.config.depth):
        for context, layers in paths:
            attn, ff = layers[i]
            latents = _ff_block(ff, _attention_block(attn, context, latents))
    return module.norm_out(module.proj_out(latents))
