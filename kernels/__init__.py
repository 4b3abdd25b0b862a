"""Triton fused kernels, each beside its plain PyTorch reference.

- `decoupled_attention` / `decoupled_attention_ref`: text + adapter cross-attention in one pass
  (forward and backward).
- `decoupled`: the backend registry (`triton`, `sdpa`, `reference`, `auto`) the engine calls.
- `projector_forward`: the instruct projector with fused Perceiver-attention and FF blocks
  (`perceiver_attention`, `feed_forward`, each beside its `_ref`), forward only.
- `group_norm_silu`, `geglu`: the UNet's and VAE's elementwise tails, fused (engine/fastpath.py).

Importing this package imports triton but touches no GPU. On the CPU the Triton kernels run only
under TRITON_INTERPRET=1, which must be set before this package is imported.
"""
from .backends import BACKENDS, choose, decoupled, decoupled_attention_sdpa, implementation, select
from .decoupled_attention import decoupled_attention, decoupled_attention_ref
from .geglu import geglu, geglu_ref
from .groupnorm_silu import group_norm_silu, group_norm_silu_ref
from .projector import perceiver_attention, perceiver_attention_ref, projector_forward
from .projector_ff import feed_forward, feed_forward_ref

__all__ = ["BACKENDS", "choose", "decoupled", "decoupled_attention", "decoupled_attention_ref",
           "decoupled_attention_sdpa", "feed_forward", "feed_forward_ref", "geglu", "geglu_ref",
           "group_norm_silu", "group_norm_silu_ref", "implementation", "perceiver_attention",
           "perceiver_attention_ref", "projector_forward", "select"]
