"""Attention processors: the seam where the adapter (and later the fused kernels) plug into the UNet.

Every cross-attention (`attn2`) gets a `DecoupledCrossAttnProcessor`:

    out = to_out( Attn(Q, K_text, V_text) + s * Attn(Q, K_ip, V_ip) )

with two separate softmaxes. K/V of the encoder tokens do not change across denoising steps, so the
pipeline computes them once per request (`precompute_kv`) and hands them to the processors in an
`AdapterContext` through `cross_attention_kwargs={"adapter": ctx}`, together with a per-row scale for
every layer. With no context a processor is exactly diffusers' plain cross-attention.

The attention itself is what the kernels' backend registry chose for the layer's device, dtype and head
size (`Pipeline.set_attention_backend`): the fused Triton kernel on CUDA, two SDPA calls elsewhere, or the
plain reference, by name. The choice is made once, so the forward holds no dispatch logic.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from ipadapter_instruct.kernels import choose, decoupled_attention_ref, decoupled_attention_sdpa, implementation

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.selfcheck import SelfCheck, describe, shape_key, upcast


@dataclass
class AdapterContext:
    """Per-call state: encoder K/V per cross-attention layer, per-row adapter scales, and regional masks.

    One adapter: k_ip, v_ip are tensors and a scale is one (B, 1, 1, 1) tensor. Several adapters (or several
    separately attended images of one): k_ip, v_ip and the scale are tuples with one entry per adapter, and
    `mask` may hold per layer a tuple of (B, Lq) float masks, one per adapter (ones where an adapter has none).
    """
    kv: dict[str, tuple] = field(default_factory=dict)        # name -> (k, v, k_ip, v_ip), each (B, H, L, D)
    scale: dict[str, object] = field(default_factory=dict)    # name -> (B, 1, 1, 1), or a tuple of them
    mask: dict[str, tuple] = field(default_factory=dict)      # name -> ((B, Lq) per adapter); absent: unmasked


def flat_scale(scale):
    """A context's scale entry as the kernels take it: (B,) or a tuple of (B,)."""
    return tuple(s.view(-1) for s in scale) if isinstance(scale, tuple) else scale.view(-1)


def _heads(attn, x: torch.Tensor) -> torch.Tensor:
    # (B, L, H*D) -> (B, H, L, D)
    return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)


class SelfAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA processor, accepting (and ignoring) the adapter context so attn1 stays quiet."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 adapter: AdapterContext | None = None, *args, **kwargs):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class DecoupledCrossAttnProcessor:
    def __init__(self, name: str, to_k_ip=None, to_v_ip=None, impl=decoupled_attention_sdpa, ips=None):
        self.name = name
        # (to_k_ip, to_v_ip) per loaded adapter; `to_k_ip`/`to_v_ip` are the first one's
        self.ips = list(ips) if ips is not None else ([] if to_k_ip is None else [(to_k_ip, to_v_ip)])
        self.impl = impl  # chosen once by the kernels' registry (Pipeline.set_attention_backend), not per call
        self.backend = "sdpa"  # the registry's name for what impl runs

    @property
    def to_k_ip(self):
        return self.ips[0][0] if self.ips else None

    @property
    def to_v_ip(self):
        return self.ips[0][1] if self.ips else None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 adapter: AdapterContext | None = None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, hgt, wid = hidden_states.shape
            hidden_states = hidden_states.view(b, c, hgt * wid).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        batch = hidden_states.shape[0]

        ip_mask = None
        if adapter is not None and self.name in adapter.kv:
            k, v, k_ip, v_ip = adapter.kv[self.name]
            scale = flat_scale(adapter.scale[self.name])
            ip_mask = adapter.mask.get(self.name)
        else:
            if encoder_hidden_states is None:
                encoder_hidden_states = hidden_states
            k, v = encoder_kv(attn, encoder_hidden_states)
            k_ip = v_ip = None
            scale = 0.0
        keep = None if attention_mask is None else _key_mask(attention_mask, batch, k.shape[2])

        q = _heads(attn, attn.to_q(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        out = self.impl(q, k, v, k_ip, v_ip, scale, keep, ip_mask)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1]).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, hgt, wid)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _key_mask(bias: torch.Tensor, batch: int, keys: int) -> torch.Tensor:
    # diffusers turns encoder_attention_mask into an additive bias (B, 1, Lt) of 0 (keep) / -10000 (drop)
    if bias.dtype == torch.bool:
        keep = bias
    else:
        keep = bias > -1.0
    if keep.numel() != batch * keys:
        raise EngineError(f"cross-attention mask must be one row of {keys} keys per batch item, "
                          f"got shape {tuple(bias.shape)}")
    return keep.reshape(batch, keys)


def encoder_kv(attn, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # tokens: (B, L, cross_dim) -> k, v: (B, H, L, D), as diffusers computes them
    if attn.norm_cross:
        tokens = attn.norm_encoder_hidden_states(tokens)
    k, v = _heads(attn, attn.to_k(tokens)), _heads(attn, attn.to_v(tokens))
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return k, v


def install_processors(unet, adapter_layers=None) -> dict[str, DecoupledCrossAttnProcessor]:
    """Put our processors on every attention of `unet`; returns the cross-attention ones by name.
    adapter_layers: one AdapterLayers, a list of them (several adapters), or None."""
    if adapter_layers is None:
        adapter_layers = []
    elif not isinstance(adapter_layers, (list, tuple)):
        adapter_layers = [adapter_layers]
    by_name = [layers.by_name() for layers in adapter_layers]
    procs, cross = {}, {}
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            ips = [(layers[name]["to_k_ip"], layers[name]["to_v_ip"]) for layers in by_name if name in layers]
            procs[name] = cross[name] = DecoupledCrossAttnProcessor(name, ips=ips)
        else:
            procs[name] = SelfAttnProcessor()
    unet.set_attn_processor(procs)
    return cross


def choose_impls(unet, cross: dict[str, DecoupledCrossAttnProcessor], device, dtype, backend: str,
                 check: SelfCheck | None = None) -> None:
    """Give every cross-attention processor the implementation the kernels' registry picks for its layer's
    device, dtype and head size when `backend` is asked for (fallbacks are logged by the registry). With `check`,
    the fused kernel is checked against SDPA at each new shape first (engine/selfcheck.py)."""
    modules = dict(unet.named_modules())
    for name, proc in cross.items():
        attn = modules[name[: -len(".processor")]]
        proc.backend = choose(device, dtype, attn.to_q.out_features // attn.heads, backend)
        proc.impl = implementation(proc.backend)
        if proc.backend == "triton" and check is not None:
            proc.impl = checked_attention(check, proc.impl)


def checked_attention(check: SelfCheck, impl):
    """The fused attention `impl` behind the first-use check: SDPA is its eager path, the plain reference in fp32
    its reference. Outside torch.compile graphs, as the kernel's own launch (kernels/backends.py)."""
    def run(q, k, v, k_ip, v_ip, scale, mask=None, ip_mask=None):
        args = (q, k, v, k_ip, v_ip, scale, mask, ip_mask)
        return check.run("decoupled_attention", shape_key(*args), lambda: impl(*args),
                         lambda: decoupled_attention_sdpa(*args), lambda: decoupled_attention_ref(*upcast(args)),
                         q.dtype, q.device, shape=f"q {describe(q)}, k {describe(k)}, ip {describe(k_ip)}")
    return torch.compiler.disable(run)


def precompute_kv(unet, cross: dict[str, DecoupledCrossAttnProcessor], text: torch.Tensor,
                  ip) -> dict[str, tuple]:
    """K/V of the encoder tokens for every cross-attention layer, once per request.

    text: (B, Lt, cross_dim) text tokens; ip: (B, Li, cross_dim) adapter tokens, None, or (several adapters) a
    list with one entry per loaded adapter: its tokens, or a list of token tensors attended separately (one per
    masked image). With a list, k_ip and v_ip are tuples in that order (the flattened entries).
    """
    modules = dict(unet.named_modules())
    kv = {}
    for name, proc in cross.items():
        attn = modules[name[: -len(".processor")]]
        k, v = encoder_kv(attn, text)
        k_ip = v_ip = None
        if isinstance(ip, (list, tuple)):
            ks, vs = [], []
            for (to_k_ip, to_v_ip), tokens in zip(proc.ips, ip):
                for t in (tokens if isinstance(tokens, (list, tuple)) else [tokens]):
                    ks.append(_heads(attn, to_k_ip(t)))
                    vs.append(_heads(attn, to_v_ip(t)))
            k_ip, v_ip = tuple(ks), tuple(vs)
        elif ip is not None and proc.to_k_ip is not None:
            k_ip, v_ip = _heads(attn, proc.to_k_ip(ip)), _heads(attn, proc.to_v_ip(ip))
        kv[name] = (k, v, k_ip, v_ip)
    return kv


def query_lengths(unet, height: int, width: int) -> dict[str, tuple[int, int]]:
    """(h, w) of the hidden states every cross-attention layer attends from, for a latent of height x width:
    down block i runs after i stride-2 downsamplers (each ceil-halves), the mid block at the smallest size, and up
    block j at the size of down block n-1-j (its upsamplers match the skip connections' sizes)."""
    sizes, size = [], (height, width)
    for block in unet.down_blocks:
        sizes.append(size)
        if getattr(block, "downsamplers", None):
            size = (-(-size[0] // 2), -(-size[1] // 2))
    out = {}
    for name in unet.attn_processors:
        if not name.endswith("attn2.processor"):
            continue
        head, index = name.split(".")[:2]
        if head == "down_blocks":
            out[name] = sizes[int(index)]
        elif head == "up_blocks":
            out[name] = sizes[len(sizes) - 1 - int(index)]
        elif head == "mid_block":
            out[name] = size
        else:
            raise EngineError(f"cannot place the cross-attention {name} in the UNet's resolutions")
    return out


def expand_scale(unet, names: list[str], scale) -> dict[str, float]:
    """Adapter strength per cross-attention layer from a float or an InstantStyle-style block dict.

    A dict follows diffusers' `set_ip_adapter_scale`: keys "down", "mid", "up"; blocks "block_i" with a
    float or one float per transformer; layers it does not name get 0.
    """
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return {n: float(scale) for n in names}
    if not isinstance(scale, dict):
        raise EngineError(f"adapter scale must be a number or a per-block dict, got {type(scale).__name__}")
    from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales
    try:
        expanded = _maybe_expand_lora_scales(unet, [scale], default_scale=0.0)[0]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise EngineError(f"bad per-block adapter scale {scale!r}: {e}") from e
    out = {}
    for n in names:
        out[n] = 0.0
        for prefix, s in expanded.items():
            if n.startswith(prefix):
                out[n] = float(s)
    return out
