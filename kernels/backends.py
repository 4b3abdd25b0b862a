"""Which implementation runs the decoupled cross-attention: `triton`, `sdpa` or `reference`.

- triton: the fused kernel (kernels/decoupled_attention.py); CUDA tensors, or CPU tensors under
  TRITON_INTERPRET=1 when asked for by name (the interpreter is a test tool, never chosen by `auto`).
- sdpa: what diffusers' IP-Adapter processor does, one `scaled_dot_product_attention` per branch and
  a scaled add. Runs everywhere.
- reference: `decoupled_attention_ref`, plain PyTorch maths.

`auto` picks triton where it can run and sdpa elsewhere. Whenever the backend that runs is not the one
asked for (or `auto` cannot take triton), the reason is logged once per distinct reason, never silently.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from ipadapter_instruct.kernels.errors import KernelError

from ipadapter_instruct.kernels import BACKENDS  # the names live in the light package module, for parsers
from ipadapter_instruct.kernels._runtime import triton_unusable
from ipadapter_instruct.kernels.decoupled_attention import MAX_HEAD_DIM, decoupled_attention_ref, normalize

log = logging.getLogger(__name__)
_logged: set[tuple[str, str, str]] = set()


def decoupled_attention_sdpa(q, k, v, k_ip, v_ip, scale, mask=None, ip_mask=None):
    """Two SDPA calls and the scaled add, as diffusers' IPAdapterAttnProcessor2_0. Same contract as the kernel,
    except that a row whose text keys are all masked gives NaN (SDPA's behaviour) instead of zeros."""
    k_ips, v_ips, scales, ip_masks = normalize(q, k, v, k_ip, v_ip, scale, mask, ip_mask)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
    for a, (ki, vi) in enumerate(zip(k_ips, v_ips)):
        w = scales[a].to(q.dtype).view(-1, 1, 1, 1)
        if ip_masks is not None:
            w = w * ip_masks[a].to(q.dtype)[:, None, :, None]
        out = out + w * F.scaled_dot_product_attention(q, ki, vi)
    return out


@functools.cache
def _triton_fn():
    from ipadapter_instruct.kernels.decoupled_attention import decoupled_attention
    # under torch.compile the launch stays outside the graph (one break per attention): dynamo cannot trace a
    # hand-launched kernel under the interpreter, and this keeps compiled UNets working on every backend
    return torch.compiler.disable(decoupled_attention)


IMPLEMENTATIONS = {"triton": _triton_fn, "sdpa": lambda: decoupled_attention_sdpa,
                   "reference": lambda: decoupled_attention_ref}


def _triton_reason(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    reason = triton_unusable(device)
    if reason is None and head_dim > MAX_HEAD_DIM:
        reason = f"head dim {head_dim} is over the kernel's {MAX_HEAD_DIM}"
    if reason is None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        reason = f"dtype {dtype}"
    return reason


def choose(device: torch.device, dtype: torch.dtype, head_dim: int, backend: str = "auto") -> str:
    """The backend that runs on tensors of this device, dtype and head size when `backend` is asked for."""
    if backend not in BACKENDS:
        raise KernelError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend in ("sdpa", "reference"):
        return backend
    device = torch.device(device)
    reason = _triton_reason(device, dtype, head_dim)
    if backend == "auto" and reason is None and device.type != "cuda":
        reason = "CPU tensors: the Triton interpreter is for tests; ask for backend='triton' to use it"
    if reason is None:
        return "triton"
    key = (backend, device.type, reason)
    if key not in _logged:
        _logged.add(key)
        level = logging.WARNING if backend == "triton" else logging.INFO
        log.log(level, "decoupled attention: %s asked, running sdpa because: %s", backend, reason)
    return "sdpa"


def select(q: torch.Tensor, backend: str = "auto") -> str:
    """The backend that will run for a query like `q` (B, H, Lq, D) when `backend` is asked for."""
    return choose(q.device, q.dtype, q.shape[-1], backend)


def implementation(name: str):
    """The function behind a resolved backend name (`triton`, `sdpa`, `reference`)."""
    return IMPLEMENTATIONS[name]()


def decoupled(q, k, v, k_ip, v_ip, scale, mask=None, ip_mask=None, backend: str = "auto"):
    """Decoupled cross-attention through the registry; arguments as `kernels.decoupled_attention`."""
    return implementation(select(q, backend))(q, k, v, k_ip, v_ip, scale, mask, ip_mask)
