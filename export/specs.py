"""One spec per exported graph, each built by its own function beside the module it traces: input and output
names, dynamic axes, sample inputs and min/opt/max profiles (what TensorRT's optimisation profile and
`python -m export verify` read). The spec types are in export/graph_spec.py.

Axis names: `batch` (UNet and projector: guidance branches x images), `latent_height`/`latent_width`
(pixels / VAE factor), `image_height`/`image_width` (pixels, the VAE encoder's input). Profiles: latent sizes from
half to twice the UNet's native size (SD1.5: 32..128, i.e. 256..1024 px, opt 512 px).

An InstructPix2Pix model (engine.EditPipeline) adds a sixth graph, vae_encoder (the photo's latent distribution: its
mean, which is the mode, and log-variance), and its UNet's `sample` has twice the latent channels: the
scheduler-scaled noisy latent, then the photo latent. An inpainting model (9-channel UNet: latents, mask, masked-photo
latent) adds vae_encoder too, and any other model with `img2img` (starting from a photo samples its latent).

An SDXL model adds text_encoder_2 (penultimate state and pooled projection); its text_encoder gives its penultimate
state too and its UNet takes the added conditioning per row.

A pipeline with ControlNets adds a controlnet graph per net and the residual inputs on the UNet (export/controlnet.py);
their sides are derived axes, "latent_height/2" (engine.exported.resolve_shape).
"""
from __future__ import annotations

from torch import nn

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.img2img import inpainting_unet

from ipadapter_instruct.export.controlnet import controlnet_specs, residual_inputs
from ipadapter_instruct.export.graph_attention import install_export_processors
from ipadapter_instruct.export.graph_spec import ONNX_DTYPES, GraphSpec, Tensor

TEXT_BATCH = (1, 4, 16)  # the text encoders' batch axis (min, opt, max)


def _token_ids(pipe, tokenizer: str) -> list[Tensor]:
    lt = pipe.tokenizer.model_max_length
    return [Tensor("input_ids", "int64", ("batch", lt), f"CLIP token ids from the model's {tokenizer}/, padded to {lt}",
                   fill="ids")]


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


def text_encoder_spec(pipe, dt: str) -> GraphSpec:
    """The last hidden state per token; SDXL's text_encoder gives its penultimate state too."""
    cfg, lt = pipe.text_encoder.config, pipe.tokenizer.model_max_length
    if pipe.kind != "sdxl":
        return GraphSpec("text_encoder", TextEncoder(pipe.text_encoder), _token_ids(pipe, "tokenizer"),
                         [Tensor("text_tokens", dt, ("batch", lt, cfg.hidden_size), "last hidden state per token")],
                         {"batch": TEXT_BATCH}, vocab=cfg.vocab_size)
    return GraphSpec(
        "text_encoder", SDXLTextEncoder(pipe.text_encoder, second=False), _token_ids(pipe, "tokenizer"),
        [Tensor("text_tokens", dt, ("batch", lt, cfg.hidden_size), "last hidden state per token (the projector's)"),
         Tensor("penultimate", dt, ("batch", lt, cfg.hidden_size),
                f"penultimate hidden state (the UNet's first {cfg.hidden_size} channels)")],
        {"batch": TEXT_BATCH}, vocab=cfg.vocab_size)


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


def text_encoder_2_spec(pipe, dt: str) -> GraphSpec:
    """SDXL's second text encoder: penultimate hidden state and pooled projection."""
    cfg, lt = pipe.text_encoder_2.config, pipe.tokenizer.model_max_length
    return GraphSpec(
        "text_encoder_2", SDXLTextEncoder(pipe.text_encoder_2, second=True), _token_ids(pipe, "tokenizer_2"),
        [Tensor("penultimate", dt, ("batch", lt, cfg.hidden_size),
                f"penultimate hidden state (the UNet's last {cfg.hidden_size} channels)"),
         Tensor("text_embeds", dt, ("batch", cfg.projection_dim), "pooled projection (the UNet's added conditioning)")],
        {"batch": TEXT_BATCH}, vocab=cfg.vocab_size)


class ImageEncoder(nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixel_values):
        # pixel_values: (B, 3, S, S) -> penultimate hidden states (B, Ni, image_dim), as IP-Adapter+ reads them
        return self.encoder(pixel_values, output_hidden_states=True).hidden_states[-2]


def _image_tokens(pipe) -> int:
    vision = pipe.image_encoder.config
    return (vision.image_size // vision.patch_size) ** 2 + 1


def image_encoder_spec(pipe, dt: str) -> GraphSpec:
    vision = pipe.image_encoder.config
    return GraphSpec("image_encoder", ImageEncoder(pipe.image_encoder),
                     [Tensor("pixel_values", dt, ("batch", 3, vision.image_size, vision.image_size),
                             "CLIP-preprocessed condition images (resize, centre crop, normalise)")],
                     [Tensor("image_tokens", dt, ("batch", _image_tokens(pipe), vision.hidden_size),
                             "penultimate hidden states")],
                     {"batch": (1, 2, 8)})


class Projector(nn.Module):
    def __init__(self, projector):
        super().__init__()
        self.projector = projector

    def forward(self, image_tokens, instruct_tokens=None, prompt_tokens=None):
        return self.projector(image_tokens, instruct_tokens, prompt_tokens)


def projector_spec(pipe, dt: str) -> GraphSpec:
    """The adapter tokens per row from the image tokens (and, for IPAdapter-Instruct, the instruction and prompt)."""
    cfg, lt = pipe.adapter.projector.config, pipe.tokenizer.model_max_length
    text_dim = pipe.text_encoder.config.hidden_size
    inputs = [Tensor("image_tokens", dt, ("batch", _image_tokens(pipe), cfg.image_dim), "image_encoder's output per "
                     "row; the all-zero image's tokens for unconditional rows")]
    if cfg.is_instruct:
        inputs += [Tensor("instruct_tokens", dt, ("batch", lt, text_dim), "text_encoder output of the instruction"),
                   Tensor("prompt_tokens", dt, ("batch", lt, text_dim), "text_encoder output of the prompt")]
    return GraphSpec("projector", Projector(pipe.adapter.projector), inputs,
                     [Tensor("ip_tokens", dt, ("batch", cfg.num_queries, pipe.unet.config.cross_attention_dim),
                             "adapter tokens per row")], {"batch": (1, 2, 16)})


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


def _latent_axes(pipe) -> dict[str, tuple[int, int, int]]:
    native = pipe.unet.config.sample_size
    sides = (native // 2, native, native * 2)  # half to twice the native size
    return {"latent_height": sides, "latent_width": sides}


def unet_spec(pipe, dt: str, attention: str) -> GraphSpec:
    """The UNet with the export processors; with ControlNets it takes their summed residuals, SDXL's takes the added
    conditioning per row, InstructPix2Pix's sample carries the photo latent."""
    cfg, proj_cfg = pipe.unet.config, pipe.adapter.projector.config
    lt, c, lc = pipe.tokenizer.model_max_length, cfg.in_channels, pipe.vae.config.latent_channels
    cross = cfg.cross_attention_dim
    rows = "rows (guidance branches x images)"
    sample = f"scaled model input, {rows}"
    # the UNet halves the latent once per down block but the last: other sizes fail inside a runtime's Concat
    notes = {"latent_multiple": 2 ** (len(cfg.block_out_channels) - 1)}
    residuals = residual_inputs(pipe, dt) if pipe.controlnets else []
    if residuals:
        notes["controlnet_residuals"] = [t.name for t in residuals]
    if pipe.kind == "edit":
        sample = (f"channels 0-{lc - 1}: the scheduler-scaled noisy latent; channels {lc}-{c - 1}: the photo latent "
                  f"(vae_encoder's output, unscaled; zeros in the unconditional branch); {rows}")
        notes["channels"] = {"latent": [0, lc], "photo_latent": [lc, c]}  # half-open ranges of `sample`
    elif inpainting_unet(pipe):
        sample = (f"channels 0-{lc - 1}: the scheduler-scaled noisy latent; channel {lc}: the mask at latent size "
                  f"(1 = repaint); channels {lc + 1}-{c - 1}: the masked photo's latent (a vae_encoder sample times "
                  f"the VAE's scaling factor); {rows}")
        notes["channels"] = {"latent": [0, lc], "mask": [lc, lc + 1], "masked_photo_latent": [lc + 1, c]}
    inputs = [Tensor("sample", dt, ("batch", c, "latent_height", "latent_width"), sample),
              Tensor("timestep", "float32", ("batch",), "the scheduler's timestep per row", fill="timestep"),
              Tensor("encoder_hidden_states", dt, ("batch", lt, cross), "text_encoder output per row"),
              Tensor("ip_tokens", dt, ("batch", proj_cfg.num_queries, cross), "projector output per row"),
              Tensor("ip_scale", "float32", ("batch",), "adapter strength per row (0 = base model)", fill="scale"),
              *residuals]
    if pipe.kind == "sdxl":
        inputs += [Tensor("text_embeds", dt, ("batch", pipe.text_encoder_2.config.projection_dim),
                          "text_encoder_2's pooled projection per row"),
                   Tensor("time_ids", dt, ("batch", 6), "original_size + crops_coords_top_left + target_size per row")]
    module = (SDXLUNet if pipe.kind == "sdxl" else UNet)(pipe.unet, pipe.adapter.layers, attention)
    # traced small (the axes stay dynamic): one forward pass at 512x512 in fp16 takes minutes on a CPU, where
    # torch has only a slow fp16 convolution. The UNet keeps a 2x2 bottom.
    side = 2 * notes["latent_multiple"]
    return GraphSpec("unet", module, inputs,
                     [Tensor("noise_pred", dt, ("batch", cfg.out_channels, "latent_height", "latent_width"),
                             "predicted noise")],
                     {"batch": (1, 2, 16), **_latent_axes(pipe)}, trace={"latent_height": side, "latent_width": side},
                     notes=notes)


class VaeDecoder(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scale = vae.config.scaling_factor
        self.shift = getattr(vae.config, "shift_factor", None) or 0.0

    def forward(self, latent):
        # latent: (B, 4, h, w) as the scheduler leaves it -> image (B, 3, f*h, f*w) in [-1, 1]
        return self.vae.decode(latent / self.scale + self.shift, return_dict=False)[0]


def vae_decoder_spec(pipe, dt: str) -> GraphSpec:
    """Traced at 8 latents a side: the VAE decoder has no down path."""
    f, lc = pipe.vae_scale_factor, pipe.vae.config.latent_channels
    return GraphSpec("vae_decoder", VaeDecoder(pipe.vae),
                     [Tensor("latent", dt, ("batch", lc, "latent_height", "latent_width"),
                             "denoised latents, unscaled (the graph divides by the VAE's scaling factor)")],
                     [Tensor("image", dt, ("batch", 3, "image_height", "image_width"),
                             f"RGB in [-1, 1], {f}x the latent")],
                     {"batch": (1, 1, 8), **_latent_axes(pipe)}, trace={"latent_height": 8, "latent_width": 8})


class VaeEncoder(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, pixels):
        # pixels: (B, 3, H, W) in [-1, 1] -> the posterior's mean (its mode, as EditPipeline.encode_photos takes it)
        # and log-variance (clamped as diffusers clamps it), each (B, 4, H/f, W/f), unscaled
        dist = self.vae.encode(pixels).latent_dist
        return dist.mean, dist.logvar


def vae_encoder_spec(pipe, dt: str) -> GraphSpec:
    """The photo's latent distribution (InstructPix2Pix reads its mode; img2img and inpainting sample it as diffusers'
    DiagonalGaussianDistribution does, with the request's generator), traced at 8 latents a side like the decoder;
    its axes are in pixels."""
    f, lc = pipe.vae_scale_factor, pipe.vae.config.latent_channels
    px = tuple(f * v for v in _latent_axes(pipe)["latent_height"])
    return GraphSpec(
        "vae_encoder", VaeEncoder(pipe.vae),
        [Tensor("pixels", dt, ("batch", 3, "image_height", "image_width"), "the photo, resized to the output "
                f"size (a multiple of {f}) and mapped to [-1, 1] (diffusers' VaeImageProcessor)", fill="pixels")],
        [Tensor("photo_latent", dt, ("batch", lc, "latent_height", "latent_width"),
                "latent_dist.mean (= mode()), unscaled: an InstructPix2Pix UNet's photo-latent channels"),
         Tensor("photo_logvar", dt, ("batch", lc, "latent_height", "latent_width"),
                "latent_dist.logvar, clamped to [-30, 20]: a sample is mean + exp(logvar / 2) x noise")],
        {"batch": (1, 1, 8), "image_height": px, "image_width": px},
        trace={"image_height": 8 * f, "image_width": 8 * f})


def encodes_photos(pipe, img2img: bool = False) -> bool:
    """Whether an export of `pipe` has vae_encoder: always for a model that cannot run without a photo
    (InstructPix2Pix, an inpainting UNet), with `img2img` for any other."""
    return img2img or pipe.kind == "edit" or inpainting_unet(pipe)


def build_specs(pipe, attention: str, img2img: bool = False) -> list[GraphSpec]:
    """The graph specs of a loaded engine.Pipeline (its UNet gets the export processors): five, text_encoder_2 for
    SDXL, vae_encoder where `encodes_photos`, and a controlnet graph per net of `pipe.controlnets`."""
    if pipe.adapter.kind == "plain":
        raise EngineError("a plain IP-Adapter (pooled embedding, 4 tokens) is not exported yet: export an "
                          "IP-Adapter+ or IPAdapter-Instruct one")
    dt = ONNX_DTYPES[pipe.dtype]
    specs = [text_encoder_spec(pipe, dt), *([text_encoder_2_spec(pipe, dt)] if pipe.kind == "sdxl" else []),
             image_encoder_spec(pipe, dt), projector_spec(pipe, dt), unet_spec(pipe, dt, attention),
             vae_decoder_spec(pipe, dt)]
    if encodes_photos(pipe, img2img):
        specs.append(vae_encoder_spec(pipe, dt))
    unet = next(s for s in specs if s.name == "unet")
    return specs + controlnet_specs(pipe, unet)
