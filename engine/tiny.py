"""Tiny random weights in the real on-disk formats, so tests and the demo run the users' loading paths.

`make_tiny(DIR)` writes:
  DIR/model/               a diffusers Stable Diffusion folder (model_index.json, unet, vae, text_encoder,
                           tokenizer, scheduler), SD1.5's layout at toy widths; VAE factor 4, not 8
                           (`make_tiny(DIR, edit=True)`: an InstructPix2Pix folder, its UNet taking 8 channels)
  DIR/image_encoder/       a transformers CLIPVisionModelWithProjection folder with its preprocessor_config.json
  DIR/adapter.safetensors  an IPAdapter-Instruct adapter in the two-key layout
  DIR/clip/                a transformers CLIPModel folder (both towers, tokenizer, image processor) for
                           `python -m bench quality --clip`
`make_tiny_single_file(DIR)` writes DIR/model/ (the tiny diffusers folder) and DIR/model.safetensors, the same
weights as one original-layout (LDM) checkpoint, as A1111 and ComfyUI users keep SD1.5 and InstructPix2Pix.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager

import torch

from ipadapter_instruct.engine.adapter import AdapterLayers, save_adapter
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.projector import InstructProjector, ProjectorConfig
from ipadapter_instruct.engine.tiny_parts import PARTS, ip2p_pipeline, sd_pipeline, write_tiny_parts

TEXT_DIM = 32      # text encoder width = UNet cross-attention width, as in SD1.5 (768)
IMAGE_DIM = 48     # CLIP vision width (1280 in ViT-H/14)
IMAGE_SIZE = 32    # CLIP input size (224)


def tiny_tokenizer(folder: str):
    """A CLIP BPE tokenizer over single bytes (no merges): real format, any text, no download."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w") as fh:
            json.dump(vocab, fh)
        with open(os.path.join(tmp, "merges.txt"), "w") as fh:
            fh.write("#version: 0.2\n")
        tok = CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"), model_max_length=77)
    tok.save_pretrained(folder)
    return tok


def tiny_base(folder: str, edit: bool = False, inpaint: bool = False) -> None:
    """The tiny SD1.5-layout model; edit: an InstructPix2Pix one (8-channel UNet, Euler ancestral scheduler,
    diffusers' StableDiffusionInstructPix2PixPipeline folder), as timbrooks/instruct-pix2pix is laid out; inpaint:
    an inpainting one (9-channel UNet: latents, mask, masked-image latents), as the SD1.5 inpainting model is."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with tempfile.TemporaryDirectory() as tmp:
        tok = tiny_tokenizer(tmp)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=8 if edit else 9 if inpaint else 4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_DIM, attention_head_dim=8,
        norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, sample_size=64)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    (ip2p_pipeline if edit else sd_pipeline)(unet, vae, text, tok, inpaint).save_pretrained(folder)


def tiny_sdxl_base(folder: str, text2_dim: int = TEXT_DIM, inpaint: bool = False, aesthetic: bool = False) -> None:
    """The tiny SDXL-layout model: two text encoders (CLIP-L-like, and a CLIPTextModelWithProjection whose pooled
    projection feeds the added conditioning), a UNet with `text_time` added conditioning (6 time ids) and
    cross-attention width = both encoders' widths side by side, SDXL's Euler scheduler config and VAE scaling
    factor, as diffusers' StableDiffusionXLPipeline saves them. text2_dim: the second encoder's width (a
    single-file checkpoint needs it unlike the first's, as in SDXL: diffusers tells the encoders apart by width).
    inpaint: a 9-channel inpainting UNet; aesthetic: 5 time ids (the refiner's aesthetic score for target_size), with
    `requires_aesthetics_score` in model_index.json (both encoders kept, unlike the refiner's release)."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with tempfile.TemporaryDirectory() as tmp:
        tok = tiny_tokenizer(tmp)
        tok2 = tiny_tokenizer(tmp)
    text_cfg = dict(vocab_size=len(tok), hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    text = CLIPTextModel(CLIPTextConfig(**text_cfg))
    text2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**text_cfg, "hidden_size": text2_dim},
                                                       projection_dim=text2_dim))
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=9 if inpaint else 4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=TEXT_DIM + text2_dim, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=(5 if aesthetic else 6) * time_dim + text2_dim, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, sample_size=64,
        scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                       interpolation_type="linear", prediction_type="epsilon")
    kind, flag = (StableDiffusionXLImg2ImgPipeline, {"requires_aesthetics_score": True}) if aesthetic else \
        (StableDiffusionXLPipeline, {})
    kind(vae=vae, text_encoder=text, text_encoder_2=text2, tokenizer=tok, tokenizer_2=tok2, unet=unet,
         scheduler=scheduler, **flag).save_pretrained(folder)


def make_tiny_sdxl(folder: str, seed: int = 0, text2_dim: int = TEXT_DIM, controlnet: bool = False,
                   lora: bool = False) -> dict[str, str]:
    """Tiny SDXL weights under `folder` (atomically): model/ (a diffusers SDXL folder), image_encoder/,
    plus.safetensors (IP-Adapter+ SDXL) and instruct.safetensors (IPAdapter-Instruct SDXL: its text inputs as wide
    as the first text encoder), both in the two-key layout with ip_adapter indices in the SDXL UNet's
    attn_processors order. text2_dim: the second text encoder's width (tiny_sdxl_base). controlnet, lora: also an
    SDXL ControlNet and LoRA (engine/tiny_parts.py).
    -> {"model", "image_encoder", "adapter" (the IP-Adapter+ one), "instruct"[, "controlnet", "lora"]}."""
    from diffusers import UNet2DConditionModel

    folder = os.path.abspath(folder)
    with atomic_folder(folder) as tmp:
        torch.manual_seed(seed)
        tiny_sdxl_base(os.path.join(tmp, "model"), text2_dim)
        tiny_image_encoder(os.path.join(tmp, "image_encoder"))
        unet = UNet2DConditionModel.from_pretrained(os.path.join(tmp, "model"), subfolder="unet")
        tiny_adapter(os.path.join(tmp, "plus.safetensors"), unet, kind="plus")
        torch.manual_seed(seed + 5)  # its own seed: the pieces above stay what they were before it was added
        tiny_adapter(os.path.join(tmp, "instruct.safetensors"), unet, kind="instruct")
        parts = write_tiny_parts(tmp, unet, seed, controlnet, lora)
    files = {"model": "model", "image_encoder": "image_encoder", "adapter": "plus.safetensors",
             "instruct": "instruct.safetensors", **{name: PARTS[name] for name in parts}}
    return {name: os.path.join(folder, rel) for name, rel in files.items()}


def tiny_image_encoder(folder: str) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from ipadapter_instruct.engine.loading import _image_processor_class

    model = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=IMAGE_DIM, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=8, projection_dim=TEXT_DIM))
    model.save_pretrained(folder)
    proc = _image_processor_class()(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    proc.save_pretrained(folder)


def tiny_clip(folder: str) -> None:
    """A random CLIPModel (width 32, 2 layers, 32 px, patch 8, projection 16) with the byte-level tokenizer and a
    32 px image processor, as `save_pretrained` writes them: what the CLIP metrics load."""
    from transformers import CLIPConfig, CLIPModel

    from ipadapter_instruct.engine.loading import _image_processor_class

    tok = tiny_tokenizer(folder)
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    text = dict(small, vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=dict(small, image_size=IMAGE_SIZE, patch_size=8),
                                 projection_dim=16))
    with torch.no_grad():  # at seed 0 every image-text cosine is negative: flipped, CLIPScore (clamped at 0) moves
        model.text_projection.weight.neg_()
    model.save_pretrained(folder)
    _image_processor_class()(size={"shortest_edge": IMAGE_SIZE},
                             crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)


def tiny_adapter(path: str, unet, kind: str = "instruct", num_queries: int = 4) -> None:
    """A random adapter for `unet` in the two-key layout. kind: "instruct", "plus" (IP-Adapter+) or "plain"
    (IP-Adapter: the projected CLIP embedding, TEXT_DIM wide, to 4 tokens).

    Depth 4 and heads = width / 64, as in every released checkpoint (diffusers' converter needs both).
    """
    if kind == "plain":
        from ipadapter_instruct.engine.projector import PlainConfig, PlainProjector
        projector = PlainProjector(PlainConfig(image_dim=TEXT_DIM, output_dim=unet.config.cross_attention_dim,
                                               num_tokens=4))
        save_adapter(path, projector, AdapterLayers(unet, unet.config.cross_attention_dim))
        return
    cfg = ProjectorConfig(dim=TEXT_DIM, depth=4, heads=1, num_queries=num_queries, image_dim=IMAGE_DIM,
                          output_dim=unet.config.cross_attention_dim, ff_mult=4,
                          text_dim=TEXT_DIM if kind == "instruct" else None)
    projector = InstructProjector(cfg)
    layers = AdapterLayers(unet, unet.config.cross_attention_dim)
    save_adapter(path, projector, layers)


def make_tiny(folder: str, seed: int = 0, edit: bool = False, controlnet: bool = False,
              lora: bool = False, inpaint: bool = False) -> dict[str, str]:
    """Write the four tiny pieces under `folder` (replacing what is there, atomically). -> their paths.
    edit: the model is an InstructPix2Pix one; inpaint: an inpainting one (9-channel UNet) (the image encoder,
    adapter and CLIP as always). controlnet, lora:
    also a ControlNet and a LoRA that fit the model (engine/tiny_parts.py; no ControlNet for InstructPix2Pix)."""
    from diffusers import UNet2DConditionModel

    if edit and controlnet:  # (EditPipeline takes none)
        raise EngineError("ControlNet with InstructPix2Pix is not built: make the edit model without controlnet")
    folder = os.path.abspath(folder)
    with atomic_folder(folder) as tmp:
        torch.manual_seed(seed)
        tiny_base(os.path.join(tmp, "model"), edit, inpaint)
        tiny_image_encoder(os.path.join(tmp, "image_encoder"))
        unet = UNet2DConditionModel.from_pretrained(os.path.join(tmp, "model"), subfolder="unet")
        tiny_adapter(os.path.join(tmp, "adapter.safetensors"), unet)
        torch.manual_seed(seed)  # its own seed: the other pieces stay what they were before it was added
        tiny_clip(os.path.join(tmp, "clip"))
        parts = write_tiny_parts(tmp, unet, seed, controlnet, lora)
    return {**tiny_paths(folder), **{name: os.path.join(folder, PARTS[name]) for name in parts}}


@contextmanager
def atomic_folder(folder: str):
    """Build into a temporary sibling of `folder`; on success it replaces `folder`, on error it is removed."""
    parent = os.path.dirname(os.path.abspath(folder)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}-", dir=parent)
    try:
        yield tmp
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)


def tiny_paths(folder: str) -> dict[str, str]:
    return {"model": os.path.join(folder, "model"), "image_encoder": os.path.join(folder, "image_encoder"),
            "adapter": os.path.join(folder, "adapter.safetensors"), "clip": os.path.join(folder, "clip")}


# diffusers -> original (LDM) layout: the reverse of diffusers' single-file converters (convert_ldm_unet_checkpoint,
# convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint in diffusers/loaders/single_file_utils.py)
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",  # SDXL
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_key(key: str, config) -> str:
    """A diffusers UNet2DConditionModel key -> its key under model.diffusion_model. (input/middle/output blocks)."""
    top = key.rsplit(".", 1)[0]
    if top in UNET_TOP:
        return UNET_TOP[top] + key[len(top):]
    per = config.layers_per_block + 1  # LDM: a level's resnets (each with its attention), then its down/upsampler
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        side, b, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if kind == "downsamplers":
            return f"input_blocks.{(b + 1) * per}.0.op.{rest.removeprefix('conv.')}"
        if kind == "upsamplers":
            return f"output_blocks.{b * per + per - 1}.{2 if 'CrossAttn' in config.up_block_types[b] else 1}.{rest}"
        index = f"input_blocks.{1 + b * per + j}" if side == "down" else f"output_blocks.{b * per + j}"
        resnet, attention = f"{index}.0", f"{index}.1"
    else:
        kind, j, rest = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key).groups()
        resnet, attention = f"middle_block.{2 * int(j)}", "middle_block.1"
    if kind == "attentions":
        return f"{attention}.{rest}"
    name, tail = rest.split(".", 1)
    return f"{resnet}.{UNET_RESNET[name]}.{tail}"


def _vae_key(key: str, levels: int) -> str:
    """A diffusers AutoencoderKL key -> its key under first_stage_model. (the decoder's levels count upwards)."""
    key = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.(resnets|downsamplers\.0)\.",
                 lambda m: f"encoder.down.{m.group(1)}.{'block' if m.group(2) == 'resnets' else 'downsample'}.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
                 lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}."
                           f"{'block' if m.group(2) == 'resnets' else 'upsample'}.", key)
    key = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", key)
    m = re.fullmatch(r"(.+)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key)
    if m:
        key = f"{m.group(1)}.mid.attn_1.{VAE_ATTENTION[m.group(2)]}.{m.group(3)}"
    return key.replace(".conv_shortcut.", ".nin_shortcut.")


def ldm_state_dict(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """SD1.5-layout diffusers modules' weights as one original-layout checkpoint: UNet under model.diffusion_model.,
    VAE under first_stage_model. (its attention projections as 1x1 convs), CLIP under cond_stage_model.transformer.,
    plus what such files carry beside them (CLIP's position ids, the DDPM noise schedule)."""
    out = {"model.diffusion_model." + _unet_key(k, unet.config): v for k, v in unet.state_dict().items()}
    for k, v in vae.state_dict().items():
        key = _vae_key(k, len(vae.config.block_out_channels))
        out["first_stage_model." + key] = v[:, :, None, None] if ".attn_1." in key and v.ndim == 2 else v
    for k, v in text_encoder.state_dict().items():
        out["cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = v
    positions = text_encoder.config.max_position_embeddings
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    out["betas"], out["alphas_cumprod"] = betas.float(), torch.cumprod(1 - betas, 0).float()
    return {k: v.contiguous() for k, v in out.items()}


def _open_clip_state(text_encoder) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection's weights in OpenCLIP's layout (SDXL's second encoder as the original checkpoint
    holds it): the reverse of diffusers' convert_open_clip_checkpoint, from diffusers' own key table."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    table = DIFFUSERS_TO_LDM_MAPPING["openclip"]
    state = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
             for k, v in text_encoder.state_dict().items()}
    out, qkv = {}, {}
    for key, v in state.items():
        if key in table["layers"]:
            out[table["layers"][key]] = v.T if key == "text_projection.weight" else v
            continue
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key)
        if m is None:
            continue  # (position ids: recomputed)
        layer, rest = m.groups()
        p = re.fullmatch(r"self_attn\.(q|k|v)_proj\.(weight|bias)", rest)
        if p:
            qkv.setdefault((layer, p.group(2)), {})[p.group(1)] = v
            continue
        for new, old in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), (".fc1.", ".c_fc."), (".fc2.", ".c_proj."),
                         ("self_attn", "attn")):
            rest = rest.replace(new, old)
        out[f"transformer.resblocks.{layer}.{rest}"] = v
    for (layer, kind), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def sgm_state_dict(unet, vae, text_encoder, text_encoder_2) -> dict[str, torch.Tensor]:
    """SDXL-layout diffusers modules' weights as one original (SGM) checkpoint, as sd_xl_base_1.0.safetensors is
    laid out: UNet under model.diffusion_model. (its added-conditioning MLP as label_emb), VAE under
    first_stage_model., CLIP-L under conditioner.embedders.0.transformer., the second encoder in OpenCLIP's layout
    under conditioner.embedders.1.model.."""
    out = {k: v for k, v in ldm_state_dict(unet, vae, text_encoder).items()
           if k.startswith(("model.diffusion_model.", "first_stage_model."))}
    for k, v in text_encoder.state_dict().items():
        out["conditioner.embedders.0.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = v
    out.update({"conditioner.embedders.1.model." + k: v for k, v in _open_clip_state(text_encoder_2).items()})
    return {k: v.contiguous() for k, v in out.items()}


def to_single_file(model: str, path: str) -> str:
    """Write the diffusers SD folder `model` as one original-layout checkpoint at `path` (.safetensors, or .ckpt:
    a pickle holding {"state_dict": ...} as the original training code saved). -> path."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from ipadapter_instruct.engine.loading import is_sdxl_folder

    parts = (UNet2DConditionModel.from_pretrained(model, subfolder="unet"),
             AutoencoderKL.from_pretrained(model, subfolder="vae"),
             CLIPTextModel.from_pretrained(model, subfolder="text_encoder"))
    if is_sdxl_folder(model):
        state = sgm_state_dict(*parts, CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2"))
    else:
        state = ldm_state_dict(*parts)
    if path.endswith(".ckpt"):
        torch.save({"state_dict": state}, path)
    else:
        save_file(state, path, metadata={"format": "pt"})
    return path


def make_tiny_single_file(folder: str, seed: int = 0, edit: bool = False, sdxl: bool = False,
                          inpaint: bool = False) -> str:
    """The tiny model twice under `folder`: model/ (diffusers, make_tiny's for the same seed) and model.safetensors
    (original layout, the same weights). -> the file's path. edit: InstructPix2Pix; inpaint: an inpainting model
    (9-channel UNet), as sd-v1-5-inpainting.ckpt is laid out; sdxl: an SDXL model (its second
    text encoder 48 wide, unlike the first's 32, as SDXL's are unlike: the single-file loader tells them apart by
    width), the file in SDXL's original layout."""
    folder = os.path.abspath(folder)
    with atomic_folder(folder) as tmp:
        torch.manual_seed(seed)
        if sdxl:
            tiny_sdxl_base(os.path.join(tmp, "model"), text2_dim=48)
        else:
            tiny_base(os.path.join(tmp, "model"), edit, inpaint)
        to_single_file(os.path.join(tmp, "model"), os.path.join(tmp, "model.safetensors"))
    return os.path.join(folder, "model.safetensors")
