"""What the trainer trains: the instruct projector and every to_k_ip/to_v_ip on a frozen SD1.5.

Starting points (SPEC.md, Training):
- from an IP-Adapter+ checkpoint: its image path (projector `layers.*`, proj_in, proj_out, norm_out, latents)
  and its to_k_ip/to_v_ip are copied; the new prompt and instruction paths get white noise (sigma 1e-4) and
  the last Linear of each of their residual branches starts at zero, so the model starts as IP-Adapter+;
- from an IPAdapter-Instruct checkpoint: everything is loaded and training continues;
- from scratch: a projector of the SD1.5 layout (sizes from the base model and image encoder), and
  to_k_ip/to_v_ip copied from each layer's to_k/to_v, as IP-Adapter initialises them.

`AdapterModel` is what accelerate prepares: the frozen UNet and the trained modules in one nn.Module whose
forward is the trained part of a micro-step (projector, K/V, UNet), as IP-Adapter's training script wraps them,
so DDP all-reduces the gradients while the backward pass is still running.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ipadapter_instruct.engine.adapter import Adapter, AdapterLayers, cross_attention_layers, load_adapter
from ipadapter_instruct.engine.attention import AdapterContext, install_processors, precompute_kv
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.loading import native_from_configs
from ipadapter_instruct.engine.projector import DIM_HEAD, InstructProjector, ProjectorConfig

NEW_PATHS = ("prompt_layers", "new_input_layers", "proj_prompt_input", "proj_new_input")


def _noise_new_paths(projector: InstructProjector, sigma: float = 1e-4) -> None:
    # white noise in the new paths, LayerNorms as identity, each residual branch's last Linear at zero
    with torch.no_grad():
        for prefix in NEW_PATHS:
            module = getattr(projector, prefix)
            for m in module.modules():
                if isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=sigma)
                    if m.bias is not None:
                        nn.init.normal_(m.bias, std=sigma)
        for path in (projector.prompt_layers, projector.new_input_layers):
            for attn, ff in path:
                nn.init.zeros_(attn.to_out.weight)
                nn.init.zeros_(ff[3].weight)


def _from_plus(plus: Adapter, text_dim: int) -> Adapter:
    cfg = dataclasses.replace(plus.projector.config, text_dim=text_dim)
    projector = InstructProjector(cfg)
    missing, unexpected = projector.load_state_dict(plus.projector.state_dict(), strict=False)
    if unexpected or any(not k.startswith(NEW_PATHS) for k in missing):
        raise EngineError(f"IP-Adapter+ projector does not fit the instruct layout: unexpected {unexpected}, "
                          f"missing {[k for k in missing if not k.startswith(NEW_PATHS)]}")
    _noise_new_paths(projector)
    return Adapter(projector, plus.layers)


def _from_scratch(unet, image_dim: int, text_dim: int) -> Adapter:
    cross = unet.config.cross_attention_dim
    cfg = ProjectorConfig(dim=cross, depth=4, heads=max(1, cross // DIM_HEAD), num_queries=16, image_dim=image_dim,
                          output_dim=cross, ff_mult=4, text_dim=text_dim)
    layers = AdapterLayers(unet, cross)
    with torch.no_grad():
        by_index = {str(i): attn for i, _, attn in cross_attention_layers(unet)}
        for idx, layer in layers.layers.items():
            layer["to_k_ip"].weight.copy_(by_index[idx].to_k.weight)
            layer["to_v_ip"].weight.copy_(by_index[idx].to_v.weight)
    return Adapter(InstructProjector(cfg), layers)


def init_adapter(unet, image_dim: int, text_dim: int, init: str | None = None) -> Adapter:
    """The adapter to train, in fp32, from `init` (IP-Adapter+ or IPAdapter-Instruct file) or from scratch."""
    if init is None:
        return _from_scratch(unet, image_dim, text_dim)
    loaded = load_adapter(init, unet)
    if loaded.kind == "plain":
        raise EngineError(f"{init} is a plain IP-Adapter (pooled embedding, 4 tokens): --init-adapter takes an "
                          "IP-Adapter+ or IPAdapter-Instruct file")
    if loaded.projector.config.image_dim != image_dim:
        raise EngineError(f"{init} expects {loaded.projector.config.image_dim}-wide image tokens but the image "
                          f"encoder makes {image_dim}-wide ones")
    if loaded.kind == "instruct":
        return loaded
    return _from_plus(loaded, text_dim)


def native_resolution(unet, vae) -> int:
    """The base model's native image size in pixels: UNet sample_size x VAE factor (512 for SD1.5)."""
    return native_from_configs(unet.config, vae.config)[0]


class AdapterModel(nn.Module):
    """Frozen UNet + trained projector and to_k_ip/to_v_ip; forward -> the UNet's noise (or v) prediction."""

    def __init__(self, unet, adapter: Adapter):
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)
        # what the optimizer, EMA and checkpoints see ("projector.*", "layers.*")
        self.trained = nn.ModuleDict({"projector": adapter.projector, "layers": adapter.layers})
        self.cross = install_processors(unet, adapter.layers)  # processor name -> processor (not a module)

    def train(self, mode: bool = True) -> "AdapterModel":
        super().train(mode)
        self.unet.eval()  # frozen: always in inference mode, as the engine runs it
        return self

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, text: torch.Tensor, image: torch.Tensor,
                instruct: torch.Tensor) -> torch.Tensor:
        # noisy: (B, C, h, w); t: (B,); text, instruct: (B, 77, text_dim); image: (B, Ni, image_dim)
        ip = self.trained["projector"](image, instruct, text)
        ones = torch.ones(len(noisy), 1, 1, 1, device=noisy.device)
        ctx = AdapterContext(kv=precompute_kv(self.unet, self.cross, text, ip), scale=dict.fromkeys(self.cross, ones))
        return self.unet(noisy, t, encoder_hidden_states=text, cross_attention_kwargs={"adapter": ctx}).sample
