"""Triton fused kernels, each beside its plain PyTorch reference.

- `decoupled_attention` / `decoupled_attention_ref`: text + adapter cross-attention in one pass
  (forward and backward).
- `decoupled`: the backend registry (`triton`, `sdpa`, `reference`, `auto`) the engine calls.
- `projector_forward`: the instruct projector with fused Perceiver-attention and FF blocks
  (`perceiver_attention`, `feed_forward`, each beside its `_ref`), forward only.
- `group_norm_silu`, `geglu`: the UNet's and VAE's elementwise tails, fused (engine/fastpath.py).

Importing this package imports nothing heavy: each name loads its module (torch, triton) on first use,
so a command-line parser can read `BACKENDS` without paying for torch. No name touches a GPU on import.
On the CPU the Triton kernels run only under TRITON_INTERPRET=1, which must be set before the first
kernel module is imported.
"""
import importlib
import sys
import types

if __name__ == "kernels":  # this folder by its bare name, from a checkout's root: the name is Hugging Face's package
    from ipadapter_instruct._checkout import hand_over
    hand_over(__name__)

# the backend names, light for parsers (kernels.backends uses this tuple)
BACKENDS = ("auto", "triton", "sdpa", "reference")

_HOME = {
    "backends": ("choose", "decoupled", "decoupled_attention_sdpa", "implementation", "select"),
    "decoupled_attention": ("decoupled_attention", "decoupled_attention_ref"),
    "geglu": ("geglu", "geglu_ref"),
    "groupnorm_silu": ("group_norm_silu", "group_norm_silu_ref"),
    "projector": ("perceiver_attention", "perceiver_attention_ref", "projector_forward"),
    "projector_ff": ("feed_forward", "feed_forward_ref"),
}
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}

__all__ = sorted(["BACKENDS", *_MODULE_OF])


def __getattr__(name):
    if name in _MODULE_OF:
        value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
        globals()[name] = value  # once loaded, a plain attribute
        return value
    raise AttributeError(f"module 'ipadapter_instruct.kernels' has no attribute {name!r}")


def __dir__():
    return __all__


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # the import system sets `kernels.<sub>` to a submodule when it first loads; `decoupled_attention` and
        # `geglu` name both a module and its public function, and the package name stays the function
        if isinstance(value, types.ModuleType) and _MODULE_OF.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


if __name__ != "kernels":
    sys.modules[__name__].__class__ = _Package
