"""The instruct projector: a Perceiver resampler turning CLIP image tokens (plus, for IPAdapter-Instruct,
the instruction and prompt tokens) into the adapter's image-prompt tokens.

Module names follow the released checkpoints exactly (SPEC.md section 1), so a checkpoint's
`image_proj` state dict loads with `strict=True`. IP-Adapter+ is the same module with only the image
path (`layers.*`). Every size is read off the tensors by `ProjectorConfig.from_state_dict`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ipadapter_instruct.engine.errors import EngineError

DIM_HEAD = 64  # every released checkpoint: heads = inner width / 64


@dataclass(frozen=True)
class ProjectorConfig:
    dim: int            # latent width (768 for SD1.5)
    depth: int          # layers per path (4)
    heads: int          # attention heads (12); dim_head is 64
    num_queries: int    # output tokens (16)
    image_dim: int      # CLIP vision hidden width (1280 for ViT-H/14)
    output_dim: int     # UNet cross-attention width (768)
    ff_mult: int        # image-path FF expansion (4)
    text_dim: int | None = None     # instruction/prompt token width (768); None = IP-Adapter+ (image path only)
    prompt_ff_mult: int = 2
    instruct_ff_mult: int = 2

    @property
    def is_instruct(self) -> bool:
        return self.text_dim is not None

    @classmethod
    def preset(cls, name: str) -> "ProjectorConfig":
        presets = {
            "sd15": cls(dim=768, depth=4, heads=12, num_queries=16, image_dim=1280, output_dim=768, ff_mult=4, text_dim=768),
            "sd15-plus": cls(dim=768, depth=4, heads=12, num_queries=16, image_dim=1280, output_dim=768, ff_mult=4),
        }
        if name not in presets:
            raise EngineError(f"unknown projector preset {name!r}; known: {', '.join(presets)}")
        return presets[name]

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "ProjectorConfig":
        """Infer every size from a checkpoint's `image_proj` tensors."""
        need = ["latents", "proj_in.weight", "proj_out.weight", "layers.0.0.to_q.weight", "layers.0.1.1.weight"]
        missing = [k for k in need if k not in sd]
        if missing:
            raise EngineError(f"adapter image_proj is missing keys needed to infer its sizes: {', '.join(missing)}")
        latents = sd["latents"]
        if latents.ndim != 3:
            raise EngineError(f"adapter image_proj.latents must be (1, queries, dim), got {tuple(latents.shape)}")
        dim = latents.shape[2]
        inner = sd["layers.0.0.to_q.weight"].shape[0]
        if inner % DIM_HEAD:
            raise EngineError(f"adapter attention width {inner} is not a multiple of the head size {DIM_HEAD}")

        def depth_of(prefix: str) -> int:
            idx = {int(m.group(1)) for k in sd if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
            return max(idx) + 1 if idx else 0

        def mult_of(prefix: str) -> int:
            return sd[f"{prefix}.0.1.1.weight"].shape[0] // dim

        depth = depth_of("layers")
        text_dim = None
        prompt_mult = instruct_mult = 2
        if "proj_new_input.weight" in sd or "proj_prompt_input.weight" in sd:
            for k in ("proj_new_input.weight", "proj_prompt_input.weight", "new_input_layers.0.1.1.weight",
                      "prompt_layers.0.1.1.weight"):
                if k not in sd:
                    raise EngineError(f"adapter image_proj looks like IPAdapter-Instruct but lacks {k}")
            text_dim = sd["proj_new_input.weight"].shape[1]
            prompt_mult, instruct_mult = mult_of("prompt_layers"), mult_of("new_input_layers")
        return cls(dim=dim, depth=depth, heads=inner // DIM_HEAD, num_queries=latents.shape[1],
                   image_dim=sd["proj_in.weight"].shape[1], output_dim=sd["proj_out.weight"].shape[0],
                   ff_mult=mult_of("layers"), text_dim=text_dim,
                   prompt_ff_mult=prompt_mult, instruct_ff_mult=instruct_mult)


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    # keys .0 (LayerNorm), .1 (Linear), .3 (Linear) as in the checkpoints
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class PerceiverAttention(nn.Module):
    """Latents attend to concat(context, latents); both LayerNormed first. Plain PyTorch reference."""

    def __init__(self, dim: int, heads: int, dim_head: int = DIM_HEAD):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        # x: (B, N, dim) context tokens; latents: (B, Q, dim) -> (B, Q, dim)
        b, nq, _ = latents.shape
        x = self.norm1(x)
        latents = self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2) for t in (q, k, v))
        s = self.dim_head ** -0.25  # scale both sides: steadier in fp16 than dividing the scores
        w = (q * s) @ (k * s).transpose(-2, -1)
        w = torch.softmax(w.float(), dim=-1).to(w.dtype)
        out = (w @ v).transpose(1, 2).reshape(b, nq, -1)
        return self.to_out(out)


def _path(cfg: ProjectorConfig, mult: int) -> nn.ModuleList:
    return nn.ModuleList(nn.ModuleList([PerceiverAttention(cfg.dim, cfg.heads), feed_forward(cfg.dim, mult)])
                         for _ in range(cfg.depth))


class InstructProjector(nn.Module):
    """P(image tokens, instruction tokens, prompt tokens) -> (B, num_queries, output_dim)."""

    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.config = cfg
        self.latents = nn.Parameter(torch.randn(1, cfg.num_queries, cfg.dim) / cfg.dim ** 0.5)
        self.proj_in = nn.Linear(cfg.image_dim, cfg.dim)
        self.layers = _path(cfg, cfg.ff_mult)
        if cfg.is_instruct:
            self.proj_prompt_input = nn.Linear(cfg.text_dim, cfg.dim)
            self.proj_new_input = nn.Linear(cfg.text_dim, cfg.dim)
            self.prompt_layers = _path(cfg, cfg.prompt_ff_mult)
            self.new_input_layers = _path(cfg, cfg.instruct_ff_mult)
        self.proj_out = nn.Linear(cfg.dim, cfg.output_dim)
        self.norm_out = nn.LayerNorm(cfg.output_dim)

    def forward(self, image: torch.Tensor, instruct: torch.Tensor | None = None,
                prompt: torch.Tensor | None = None) -> torch.Tensor:
        # image: (B, Ni, image_dim) penultimate CLIP hidden states; instruct, prompt: (B, Lt, text_dim)
        x = self.proj_in(image)
        latents = self.latents.expand(x.shape[0], -1, -1)
        if not self.config.is_instruct:
            for attn, ff in self.layers:
                latents = attn(x, latents) + latents
                latents = ff(latents) + latents
            return self.norm_out(self.proj_out(latents))
        if instruct is None or prompt is None:
            raise EngineError("an IPAdapter-Instruct projector needs instruction and prompt tokens")
        p = self.proj_prompt_input(prompt)
        n = self.proj_new_input(instruct)
        for (ia, iff), (pa, pff), (na, nff) in zip(self.layers, self.prompt_layers, self.new_input_layers):
            latents = ia(x, latents) + latents
            latents = iff(latents) + latents
            latents = pa(p, latents) + latents
            latents = pff(latents) + latents
            latents = na(n, latents) + latents
            latents = nff(latents) + latents
        return self.norm_out(self.proj_out(latents))


def check_state_dict(module: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Raise one EngineError naming every missing, unexpected and mis-shaped key (never load partially)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    misshaped = sorted(f"{k} {tuple(sd[k].shape)} (expected {tuple(own[k].shape)})"
                       for k in set(own) & set(sd) if sd[k].shape != own[k].shape)
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            problems.append(f"{label} keys: {shown}")
    if problems:
        raise EngineError(f"{what} does not match the model: " + "; ".join(problems))


@dataclass(frozen=True)
class PlainConfig:
    """Plain IP-Adapter (ip-adapter_sd15.bin): the pooled, projected CLIP image embedding -> num_tokens tokens."""
    image_dim: int      # CLIP's projected embedding width (1024 for ViT-H/14), not the hidden width
    output_dim: int     # UNet cross-attention width (768)
    num_tokens: int     # 4 in every release
    text_dim = None
    is_instruct = False
    pooled = True       # the pipeline feeds image_embeds, and zeros (not the zero image) for unconditional rows


class PlainProjector(nn.Module):
    """The release's ImageProjModel: Linear(image_dim, tokens x width), reshape, LayerNorm. Keys proj.*, norm.*."""

    def __init__(self, cfg: PlainConfig):
        super().__init__()
        self.config = cfg
        self.proj = nn.Linear(cfg.image_dim, cfg.output_dim * cfg.num_tokens)
        self.norm = nn.LayerNorm(cfg.output_dim)

    def forward(self, image: torch.Tensor, instruct=None, prompt=None) -> torch.Tensor:
        # image: (B, image_dim) pooled embeddings -> (B, num_tokens, output_dim)
        return self.norm(self.proj(image).reshape(-1, self.config.num_tokens, self.config.output_dim))


def load_projector(sd: dict[str, torch.Tensor]) -> nn.Module:
    if "proj.weight" in sd and "norm.weight" in sd and "latents" not in sd:  # a plain IP-Adapter
        width = sd["norm.weight"].shape[0]
        if sd["proj.weight"].ndim != 2 or sd["proj.weight"].shape[0] % width:
            raise EngineError(f"adapter image_proj.proj.weight {tuple(sd['proj.weight'].shape)} is not a multiple "
                              f"of the token width {width}")
        cfg = PlainConfig(image_dim=sd["proj.weight"].shape[1], output_dim=width,
                          num_tokens=sd["proj.weight"].shape[0] // width)
        module = PlainProjector(cfg)
        check_state_dict(module, sd, "adapter image_proj")
        module.load_state_dict(sd, strict=True)
        return module
    cfg = ProjectorConfig.from_state_dict(sd)
    module = InstructProjector(cfg)
    check_state_dict(module, sd, "adapter image_proj")
    module.load_state_dict(sd, strict=True)
    return module
