"""Triton fused kernels, each beside its plain PyTorch reference.

- `decoupled_attention` / `decoupled_attention_ref`: text + adapter cross-attention in one pass
  (forward and backward).
- `decoupled`: the backend registry (`triton`, `sdpa`, `reference`, `auto`) the engine calls.

Importing this package imports triton but touches no GPU. On the CPU the Triton kernels run only
under TRITON_INTERPRET=1, which must be set before this package is imported.
"""
from .backends import BACKENDS, decoupled, decoupled_attention_sdpa, select
from .decoupled_attention import decoupled_attention, decoupled_attention_ref

__all__ = ["BACKENDS", "decoupled", "decoupled_attention", "decoupled_attention_ref", "decoupled_attention_sdpa",
           "select"]
