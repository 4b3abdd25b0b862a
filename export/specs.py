"""One spec per exported graph: the module to trace, input and output names, dynamic axes, sample inputs and
min/opt/max profiles (what TensorRT's optimisation profile and `python -m export verify` read).

Axis names: `batch` (UNet and projector: guidance branches x images), `latent_height`/`latent_width`
(pixels / VAE factor), `image_height`/`image_width` (pixels, the VAE encoder's input). Profiles: latent sizes from
half to twice the UNet's native size (SD1.5: 32..128, i.e. 256..1024 px, opt 512 px).

An InstructPix2Pix model (engine.EditPipeline) adds a sixth graph, vae_encoder (the photo's latent), and its UNet's
`sample` has twice the latent channels: the scheduler-scaled noisy latent, then the photo latent.

A pipeline with ControlNets adds a controlnet graph per net and the residual inputs on the UNet (export/controlnet.py);
their sides are derived axes, "latent_height/2" (engine.exported.resolve_shape).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from engine.errors import EngineError
from engine.exported import resolve_shape

from .graph_attention import install_export_processors

ONNX_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64"}


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str                     # float32 | float16 | int64
    shape: tuple                   # ints and axis names
    meaning: str
    fill: str = "normal"           # sample values: normal | timestep | scale | ids | pixels | unit


@dataclass
class GraphSpec:
    name: str
    module: nn.Module
    inputs: list[Tensor]
    outputs: list[Tensor]
    axes: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # axis -> (min, opt, max)
    vocab: int = 0
    trace: dict[str, int] = field(default_factory=dict)  # axis sizes to trace at, over the opt ones
    notes: dict = field(default_factory=dict)  # extra keys for the graph's manifest entry

    def trace_sizes(self) -> dict[str, int]:
        return {**self.sizes("opt"), **self.trace}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {i: a for i, a in enumerate(t.shape) if isinstance(a, str)} for t in self.inputs + self.outputs}

    def shape(self, t: Tensor, sizes: dict[str, int]) -> tuple[int, ...]:
        return resolve_shape(t.shape, sizes)

    def sizes(self, level: str) -> dict[str, int]:
        i = ("min", "opt", "max").index(level)
        return {a: v[i] for a, v in self.axes.items()}

    def profiles(self) -> dict[str, dict[str, list[int]]]:
        return {lv: {t.name: list(self.shape(t, self.sizes(lv))) for t in self.inputs} for lv in ("min", "opt", "max")}

    def sample(self, sizes: dict[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
        return sample_inputs(self.inputs, sizes, self.vocab, seed)


def sample_inputs(inputs, sizes: dict[str, int], vocab: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of the given axis sizes, each kind in its meaningful range."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in inputs:
        shape = resolve_shape(t.shape, sizes)
        if t.fill == "ids":
            x = torch.randint(0, vocab, shape, generator=g)
        elif t.fill == "timestep":
            x = torch.rand(shape, generator=g) * 999
        elif t.fill == "scale":
            x = torch.rand(shape, generator=g) * 1.5
        elif t.fill == "pixels":
            x = torch.rand(shape, generator=g) * 2 - 1
        elif t.fill == "unit":
            x = torch.rand(shape, generator=g)
        else:
            x = torch.randn(shape, generator=g)
        out[t.name] = x.to(getattr(torch, t.dtype))
    return out


class TextEncoder(nn.Module):
    def __init__(self, encoder):
        super().__init__()
        # transformers' eager attention: the SDPA path exports with an fp32 causal mask that upcasts the fp16
        # graph halfway (ill-typed LayerNorm inputs ONNX Runtime refuses to load)
        encoder.set_attn_implementation("eager")
        self.encoder = encoder

    def forward(self, input_ids):
        # input_ids: (B, 77) -> (B, 77, text_dim)
        return self.encoder(input_ids=input_ids).last_hidden_state


class SDXLTextEncoder(nn.Module):
    """SDXL's text encoders: the first gives (last hidden state: the Instruct projector's input, penultimate hidden
    state: the UNet's first channels); the second, a CLIPTextModelWithProjection, (penultimate hidden state,
    pooled projection)."""

    def __init__(self, encoder, second: bool):
        super().__init__()
        encoder.set_attn_implementation("eager")  # as TextEncoder
        self.encoder, self.second = encoder, second

    def forward(self, input_ids):
        out = self.encoder(input_ids=input_ids, output_hidden_states=True)
        if self.second:
            return out.hidden_states[-2], out.text_embeds
        return out.last_hidden_state, out.hidden_states[-2]


class ImageEncoder(nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixel_values):
        # pixel_values: (B, 3, S, S) -> penultimate hidden states (B, Ni, image_dim), as IP-Adapter+ reads them
        return self.encoder(pixel_values, output_hidden_states=True).hidden_states[-2]


class Projector(nn.Module):
    def __init__(self, projector):
        super().__init__()
        self.projector = projector

    def forward(self, image_tokens, instruct_tokens=None, prompt_tokens=None):
        return self.projector(image_tokens, instruct_tokens, prompt_tokens)


class UNet(nn.Module):
    def __init__(self, unet, layers, attention: str):
        super().__init__()
        install_export_processors(unet, layers, attention)
        self.unet, self.layers = unet, layers

    def forward(self, sample, timestep, encoder_hidden_states, ip_tokens, ip_scale, *residuals):
        # sample: (B, C, h, w), C = 8 for InstructPix2Pix (latent, photo latent); timestep: (B,);
        # text: (B, 77, cross); ip_tokens: (B, Q, cross); ip_scale: (B,);
        # residuals (with ControlNets only): the down residuals, then the mid one, each (B, C_i, h/d_i, w/d_i)
        extra = {} if not residuals else dict(down_block_additional_residuals=list(residuals[:-1]),
                                              mid_block_additional_residual=residuals[-1])
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False,
                         cross_attention_kwargs={"ip_tokens": ip_tokens, "ip_scale": ip_scale}, **extra)[0]


class SDXLUNet(UNet):
    def forward(self, sample, timestep, encoder_hidden_states, ip_tokens, ip_scale, text_embeds, time_ids):
        # as UNet, plus SDXL's added conditioning per row: text_embeds (B, pooled), time_ids (B, 6)
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False,
                         cross_attention_kwargs={"ip_tokens": ip_tokens, "ip_scale": ip_scale},
                         added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})[0]


class VaeDecoder(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scale = vae.config.scaling_factor
        self.shift = getattr(vae.config, "shift_factor", None) or 0.0

    def forward(self, latent):
        # latent: (B, 4, h, w) as the scheduler leaves it -> image (B, 3, f*h, f*w) in [-1, 1]
        return self.vae.decode(latent / self.scale + self.shift, return_dict=False)[0]


class VaeEncoder(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, pixels):
        # pixels: (B, 3, H, W) in [-1, 1] -> the posterior's mode (B, 4, H/f, W/f), unscaled, as
        # EditPipeline.encode_photos takes it
        return self.vae.encode(pixels).latent_dist.mode()


def build_specs(pipe, attention: str) -> list[GraphSpec]:
    """The graph specs of a loaded engine.Pipeline (its UNet gets the export processors): five, vae_encoder for
    an engine.EditPipeline, and a controlnet graph per net of `pipe.controlnets` (the UNet then takes residuals)."""
    from .controlnet import controlnet_specs, residual_inputs

    dt = ONNX_DTYPES[pipe.dtype]
    if pipe.adapter.kind == "plain":
        raise EngineError("a plain IP-Adapter (pooled embedding, 4 tokens) is not exported yet: export an "
                          "IP-Adapter+ or IPAdapter-Instruct one")
    unet_cfg, proj_cfg = pipe.unet.config, pipe.adapter.projector.config
    text_dim = pipe.text_encoder.config.hidden_size
    lt = pipe.tokenizer.model_max_length
    vision = pipe.image_encoder.config
    ni = (vision.image_size // vision.patch_size) ** 2 + 1
    native = unet_cfg.sample_size
    latent = (native // 2, native, native * 2)
    f = pipe.vae_scale_factor
    c, lc = unet_cfg.in_channels, pipe.vae.config.latent_channels
    cross = unet_cfg.cross_attention_dim
    b = {"batch": (1, 2, 16)}
    # traced small (the axes stay dynamic): one forward pass at 512x512 in fp16 takes minutes on a CPU, where
    # torch has only a slow fp16 convolution. The UNet keeps a 2x2 bottom, the VAE decoder has no down path.
    unet_trace = 2 * 2 ** (len(unet_cfg.block_out_channels) - 1)
    unet_trace = {"latent_height": unet_trace, "latent_width": unet_trace}
    lat_axes = {"latent_height": latent, "latent_width": latent}
    rows = "rows (guidance branches x images)"
    proj_in = [Tensor("image_tokens", dt, ("batch", ni, proj_cfg.image_dim), "image_encoder's output per row; "
                      "the all-zero image's tokens for unconditional rows")]
    if proj_cfg.is_instruct:
        proj_in += [Tensor("instruct_tokens", dt, ("batch", lt, text_dim), "text_encoder output of the instruction"),
                    Tensor("prompt_tokens", dt, ("batch", lt, text_dim), "text_encoder output of the prompt")]
    sample = f"scaled model input, {rows}"
    # the UNet halves the latent once per down block but the last: other sizes fail inside a runtime's Concat
    unet_notes = {"latent_multiple": 2 ** (len(unet_cfg.block_out_channels) - 1)}
    residuals = residual_inputs(pipe, dt) if pipe.controlnets else []
    if residuals:
        unet_notes["controlnet_residuals"] = [t.name for t in residuals]
    if pipe.EDIT:
        sample = (f"channels 0-{lc - 1}: the scheduler-scaled noisy latent; channels {lc}-{c - 1}: the photo latent "
                  f"(vae_encoder's output, unscaled; zeros in the unconditional branch); {rows}")
        unet_notes["channels"] = {"latent": [0, lc], "photo_latent": [lc, c]}  # half-open ranges of `sample`
    specs = [
        GraphSpec("text_encoder", TextEncoder(pipe.text_encoder),
                  [Tensor("input_ids", "int64", ("batch", lt), "CLIP token ids from the model's tokenizer/, "
                          f"padded to {lt}", fill="ids")],
                  [Tensor("text_tokens", dt, ("batch", lt, text_dim), "last hidden state per token")],
                  {"batch": (1, 4, 16)}, vocab=pipe.text_encoder.config.vocab_size),
        GraphSpec("image_encoder", ImageEncoder(pipe.image_encoder),
                  [Tensor("pixel_values", dt, ("batch", 3, vision.image_size, vision.image_size),
                          "CLIP-preprocessed condition images (resize, centre crop, normalise)")],
                  [Tensor("image_tokens", dt, ("batch", ni, vision.hidden_size), "penultimate hidden states")],
                  {"batch": (1, 2, 8)}),
        GraphSpec("projector", Projector(pipe.adapter.projector), proj_in,
                  [Tensor("ip_tokens", dt, ("batch", proj_cfg.num_queries, cross), "adapter tokens per row")], b),
        GraphSpec("unet", UNet(pipe.unet, pipe.adapter.layers, attention),
                  [Tensor("sample", dt, ("batch", c, "latent_height", "latent_width"), sample),
                   Tensor("timestep", "float32", ("batch",), "the scheduler's timestep per row", fill="timestep"),
                   Tensor("encoder_hidden_states", dt, ("batch", lt, cross), "text_encoder output per row"),
                   Tensor("ip_tokens", dt, ("batch", proj_cfg.num_queries, cross), "projector output per row"),
                   Tensor("ip_scale", "float32", ("batch",), "adapter strength per row (0 = base model)",
                          fill="scale"), *residuals],
                  [Tensor("noise_pred", dt, ("batch", unet_cfg.out_channels, "latent_height", "latent_width"),
                          "predicted noise")],
                  {**b, **lat_axes}, trace=unet_trace, notes=unet_notes),
        GraphSpec("vae_decoder", VaeDecoder(pipe.vae),
                  [Tensor("latent", dt, ("batch", lc, "latent_height", "latent_width"),
                          "denoised latents, unscaled (the graph divides by the VAE's scaling factor)")],
                  [Tensor("image", dt, ("batch", 3, "image_height", "image_width"), f"RGB in [-1, 1], {f}x the latent")],
                  {"batch": (1, 1, 8), **lat_axes}, trace={"latent_height": 8, "latent_width": 8}),
    ]
    if pipe.EDIT:  # the VAE encoder traced at 8 latents a side, like the decoder; its axes are in pixels
        px = tuple(f * v for v in latent)
        specs.append(GraphSpec(
            "vae_encoder", VaeEncoder(pipe.vae),
            [Tensor("pixels", dt, ("batch", 3, "image_height", "image_width"), "the photo, resized to the output "
                    f"size (a multiple of {f}) and mapped to [-1, 1] (diffusers' VaeImageProcessor)", fill="pixels")],
            [Tensor("photo_latent", dt, ("batch", lc, "latent_height", "latent_width"),
                    "latent_dist.mode(), unscaled: the UNet's photo-latent channels")],
            {"batch": (1, 1, 8), "image_height": px, "image_width": px},
            trace={"image_height": 8 * f, "image_width": 8 * f}))
    if getattr(pipe, "SDXL", False):
        _sdxl_specs(pipe, specs, dt, lt, attention)
    unet = next(s for s in specs if s.name == "unet")
    return specs + controlnet_specs(pipe, unet)


def _sdxl_specs(pipe, specs: list, dt: str, lt: int, attention: str) -> None:
    """An SDXL export: text_encoder gives its penultimate state too, text_encoder_2 is added (penultimate state and
    pooled projection), and the UNet takes the added conditioning per row."""
    t1, t2 = pipe.text_encoder.config, pipe.text_encoder_2.config
    pooled = t2.projection_dim

    def ids(tok):
        return [Tensor("input_ids", "int64", ("batch", lt), f"CLIP token ids from the model's {tok}/, padded to {lt}",
                       fill="ids")]
    at = {s.name: i for i, s in enumerate(specs)}
    specs[at["text_encoder"]] = GraphSpec(
        "text_encoder", SDXLTextEncoder(pipe.text_encoder, second=False), ids("tokenizer"),
        [Tensor("text_tokens", dt, ("batch", lt, t1.hidden_size), "last hidden state per token (the projector's)"),
         Tensor("penultimate", dt, ("batch", lt, t1.hidden_size),
                f"penultimate hidden state (the UNet's first {t1.hidden_size} channels)")],
        {"batch": (1, 4, 16)}, vocab=t1.vocab_size)
    unet = specs[at["unet"]]
    specs[at["unet"]] = GraphSpec(
        "unet", SDXLUNet(pipe.unet, pipe.adapter.layers, attention), [
            *unet.inputs,
            Tensor("text_embeds", dt, ("batch", pooled), "text_encoder_2's pooled projection per row"),
            Tensor("time_ids", dt, ("batch", 6), "original_size + crops_coords_top_left + target_size per row")],
        unet.outputs, unet.axes, trace=unet.trace, notes=unet.notes)
    specs.insert(at["text_encoder"] + 1, GraphSpec(
        "text_encoder_2", SDXLTextEncoder(pipe.text_encoder_2, second=True), ids("tokenizer_2"),
        [Tensor("penultimate", dt, ("batch", lt, t2.hidden_size),
                f"penultimate hidden state (the UNet's last {t2.hidden_size} channels)"),
         Tensor("text_embeds", dt, ("batch", pooled), "pooled projection (the UNet's added conditioning)")],
        {"batch": (1, 4, 16)}, vocab=t2.vocab_size))
