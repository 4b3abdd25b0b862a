"""The UNet's and VAE's elementwise tails on the fused kernels: GroupNorm+SiLU in resnet blocks, GEGLU.

stable-fast reports these fusions as its largest wins after attention. `fuse(module)` points every
eligible diffusers `ResnetBlock2D` and `GEGLU` inside `module` at the fused kernels by giving the instance
its own `forward`; `unfuse(module)` removes it again, restoring diffusers' own. A resnet is eligible when it
is the plain SD kind (SiLU, time embedding added before the second norm or absent, no in-block up/down
sampling); others stay as they are. Weights are untouched, so fusing never changes what a checkpoint loads into.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from ipadapter_instruct.kernels.geglu import geglu, geglu_ref
from ipadapter_instruct.kernels.groupnorm_silu import group_norm_silu, group_norm_silu_ref

from ipadapter_instruct.engine.selfcheck import SelfCheck, describe, shape_key, upcast

_UNCHECKED = SelfCheck(enabled=False)


def _checked(check: SelfCheck):
    # the two launches behind the first-use check (engine/selfcheck.py), kept outside torch.compile graphs (as the
    # attention's are: kernels/backends.py); made when a module is fused because torch.compiler.disable imports
    # dynamo (~2 s)
    def gn_silu(x, weight, bias, groups, eps, shift=None):
        args = (x, weight, bias, groups, eps, True, shift)
        return check.run("group_norm_silu", shape_key(x, shift, groups), lambda: group_norm_silu(*args),
                         lambda: group_norm_silu_ref(*args), lambda: group_norm_silu_ref(*upcast(args)), x.dtype,
                         x.device, shape=f"x {describe(x)}" + (" channels-last" if shape_key(x)[0][3] else "")
                         + f", {groups} groups" + ("" if shift is None else ", time shift"))

    def fused_geglu(x):
        return check.run("geglu", shape_key(x), lambda: geglu(x), lambda: geglu_ref(x), lambda: geglu_ref(x.float()),
                         x.dtype, x.device, shape=f"x {describe(x)}")
    return torch.compiler.disable(gn_silu), torch.compiler.disable(fused_geglu)


def _resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs):
    # diffusers' ResnetBlock2D.forward for the eligible configuration, with norm+SiLU pairs fused and the
    # time embedding added inside the second GroupNorm's loads
    gn_silu = self._fused_gn_silu
    n1, n2 = self.norm1, self.norm2
    h = gn_silu(input_tensor, n1.weight, n1.bias, n1.num_groups, n1.eps)
    h = self.conv1(h)
    shift = None
    if self.time_emb_proj is not None and temb is not None:
        shift = self.time_emb_proj(temb if self.skip_time_act else self.nonlinearity(temb))
    h = gn_silu(h, n2.weight, n2.bias, n2.num_groups, n2.eps, shift=shift)
    h = self.conv2(self.dropout(h))
    x = self.conv_shortcut(input_tensor) if self.conv_shortcut is not None else input_tensor
    return (x + h) / self.output_scale_factor


def _geglu_forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    return self._fused_geglu(self.proj(hidden_states))


def _eligible_resnet(m: nn.Module) -> bool:
    from diffusers.models.resnet import ResnetBlock2D

    if not isinstance(m, ResnetBlock2D):
        return False
    # "default" adds the time embedding before norm2; with no time embedding (the VAE's "group" resnets) the
    # block is the same GroupNorm+SiLU chain
    plain = m.time_embedding_norm == "default" or (m.time_emb_proj is None and m.time_embedding_norm != "scale_shift")
    return (plain and m.upsample is None
            and m.downsample is None and isinstance(m.nonlinearity, nn.SiLU)
            and isinstance(m.norm1, nn.GroupNorm) and isinstance(m.norm2, nn.GroupNorm)
            and m.norm1.affine and m.norm2.affine)


def fuse(module: nn.Module, check: SelfCheck | None = None) -> int:
    """Route eligible resnets and GEGLUs in `module` to the fused kernels, each checked at its first use of a shape
    when `check` is on. Returns how many were routed."""
    from diffusers.models.activations import GEGLU

    gn_silu, fused_geglu = _checked(check or _UNCHECKED)
    count = 0
    for m in module.modules():
        if _eligible_resnet(m):
            m._fused_gn_silu = gn_silu
            m.forward = types.MethodType(_resnet_forward, m)
            count += 1
        elif type(m) is GEGLU:
            m._fused_geglu = fused_geglu
            m.forward = types.MethodType(_geglu_forward, m)
            count += 1
    return count


def unfuse(module: nn.Module) -> None:
    """Undo `fuse` (only our own forwards: an instance forward put there by anyone else, e.g. an offload
    hook, stays)."""
    for m in module.modules():
        own = m.__dict__.get("forward")
        if getattr(own, "__func__", None) in (_resnet_forward, _geglu_forward):
            del m.forward
            m.__dict__.pop("_fused_gn_silu", None)
            m.__dict__.pop("_fused_geglu", None)


def fused(module: nn.Module) -> bool:
    """Whether any resnet or GEGLU in `module` runs on the fused kernels."""
    return any(getattr(m.__dict__.get("forward"), "__func__", None) in (_resnet_forward, _geglu_forward)
               for m in module.modules())
