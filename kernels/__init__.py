"""Triton fused kernels (decoupled cross-attention, instruct projector). Not built yet: see the README."""
