"""Reading the two-key adapter checkpoints people already have, strictly.

A checkpoint is `{"image_proj": projector_state, "ip_adapter": attn_state}` as a torch pickle (`.bin`)
or a `.safetensors` file with key prefixes `image_proj.` and `ip_adapter.`. `ip_adapter` keys are indexed
by position in `unet.attn_processors` order, so SD1.5's 16 cross-attention layers sit at odd indices:
`1.to_k_ip.weight`, `1.to_v_ip.weight`, ... `31.to_v_ip.weight`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.projector import InstructProjector, check_state_dict, load_projector
from ipadapter_instruct.engine.safe_load import load_pickle


def read_adapter_file(path: str | os.PathLike) -> tuple[dict, dict]:
    """-> (image_proj state dict, ip_adapter state dict), tensors on the CPU."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise EngineError(f"adapter file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            flat = load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise EngineError(f"cannot read adapter {path}: {str(e).splitlines()[0]}") from e
        groups: dict[str, dict] = {"image_proj": {}, "ip_adapter": {}}
        stray = []
        for key, tensor in flat.items():
            head, _, rest = key.partition(".")
            if head in groups and rest:
                groups[head][rest] = tensor
            else:
                stray.append(key)
        if stray:
            raise EngineError(f"adapter {path} has keys outside image_proj./ip_adapter.: {', '.join(sorted(stray)[:8])}")
        state = groups
    else:
        state = load_pickle(path, "adapter")
        if not isinstance(state, dict):
            raise EngineError(f"adapter {path} holds a {type(state).__name__}, expected a dict with image_proj and ip_adapter")
    absent = [k for k in ("image_proj", "ip_adapter") if not state.get(k)]
    if absent:
        raise EngineError(f"adapter {path} has no {' and no '.join(absent)} weights (keys found: {', '.join(sorted(state))})")
    extra = sorted(set(state) - {"image_proj", "ip_adapter"})
    if extra:
        raise EngineError(f"adapter {path} has unexpected top-level keys: {', '.join(extra)}")
    return state["image_proj"], state["ip_adapter"]


def cross_attention_layers(unet) -> list[tuple[int, str, nn.Module]]:
    """(checkpoint index, processor name, Attention module) for every attn2 in `unet.attn_processors` order."""
    modules = dict(unet.named_modules())
    out = []
    for idx, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            out.append((idx, name, modules[name[: -len(".processor")]]))
    return out


class AdapterLayers(nn.Module):
    """The UNet-side adapter weights: to_k_ip / to_v_ip per cross-attention layer, keyed by checkpoint index."""

    def __init__(self, unet, token_dim: int):
        super().__init__()
        self.names: dict[str, str] = {}  # checkpoint index -> processor name
        layers = {}
        for idx, name, attn in cross_attention_layers(unet):
            inner = attn.to_k.out_features
            layers[str(idx)] = nn.ModuleDict({"to_k_ip": nn.Linear(token_dim, inner, bias=False),
                                              "to_v_ip": nn.Linear(token_dim, inner, bias=False)})
            self.names[str(idx)] = name
        self.layers = nn.ModuleDict(layers)

    def by_name(self) -> dict[str, nn.ModuleDict]:
        return {self.names[i]: layer for i, layer in self.layers.items()}

    def load_checkpoint(self, sd: dict[str, torch.Tensor]) -> None:
        # checkpoint keys are "1.to_k_ip.weight"; ours are "layers.1.to_k_ip.weight"
        ours = {f"layers.{k}": v for k, v in sd.items()}
        check_state_dict(self, ours, "adapter ip_adapter")
        self.load_state_dict(ours, strict=True)


@dataclass
class Adapter:
    projector: InstructProjector
    layers: AdapterLayers

    @property
    def kind(self) -> str:
        """instruct (IPAdapter-Instruct), plus (IP-Adapter+) or plain (IP-Adapter: pooled embedding, 4 tokens)."""
        if getattr(self.projector.config, "pooled", False):
            return "plain"
        return "instruct" if self.projector.config.is_instruct else "plus"


def load_adapter(path: str | os.PathLike, unet) -> Adapter:
    image_proj, ip_adapter = read_adapter_file(path)
    projector = load_projector(image_proj)
    cross_dim = unet.config.cross_attention_dim
    if projector.config.output_dim != cross_dim:
        raise EngineError(f"adapter makes {projector.config.output_dim}-wide tokens but the UNet's cross-attention "
                          f"width is {cross_dim}: adapter and base model do not belong together")
    layers = AdapterLayers(unet, cross_dim)
    layers.load_checkpoint(ip_adapter)
    return Adapter(projector, layers)


def adapter_state(projector: nn.Module, layers: AdapterLayers) -> dict[str, torch.Tensor]:
    """The flat two-key layout: `image_proj.*` and `ip_adapter.<index>.to_{k,v}_ip.weight`."""
    flat = {f"image_proj.{k}": v for k, v in projector.state_dict().items()}
    flat.update({f"ip_adapter.{k[len('layers.'):]}": v for k, v in layers.state_dict().items()})
    return {k: v.detach().contiguous().cpu() for k, v in flat.items()}


def save_adapter(path: str | os.PathLike, projector: nn.Module, layers: AdapterLayers) -> None:
    """Write `.safetensors` (flat prefixed keys) or `.bin` (two-key torch pickle), atomically."""
    path = os.fspath(path)
    flat = adapter_state(projector, layers)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import save_file
            save_file(flat, tmp)
        else:
            nested = {"image_proj": {}, "ip_adapter": {}}
            for k, v in flat.items():
                head, _, rest = k.partition(".")
                nested[head][rest] = v
            torch.save(nested, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
