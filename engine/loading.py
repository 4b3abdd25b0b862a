"""Loading the pieces users already have on disk (or on the hub, when online), with one-line errors.

Light at import (no torch or diffusers until a loader runs): the command line checks sizes and paths with it
before anything heavy loads. The base model is a diffusers folder (or hub id, engine/model_folders.py), or one
original-layout checkpoint file (engine/single_file.py); the image encoder, condition images and per-call
schedulers load here too.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from typing import TYPE_CHECKING

from PIL import Image

from ipadapter_instruct.engine import MAX_SIZE_FACTOR
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.model_folders import BASE_PARTS, folder_scheduler, is_sdxl_folder, load_part, resolve
from ipadapter_instruct.engine.single_file import checkpoint_kind, checkpoint_shapes, config_folder, is_checkpoint_file, load_single_file

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def read_configs(model, config=None) -> tuple[dict, dict] | None:
    """(unet/config.json, vae/config.json) of a local diffusers folder, without loading weights; for a single-file
    checkpoint, those of the config folder it would load with (`config`, or the shipped one its header asks for).
    None when there is nothing to read or the file and its configs disagree: the loader then names what is wrong."""
    src = os.path.expanduser(os.fspath(model))
    if is_checkpoint_file(src):
        try:
            src = config_folder(src, checkpoint_kind(src, checkpoint_shapes(src)), config)
        except EngineError:
            return None
    try:
        with open(os.path.join(src, "unet", "config.json")) as fh:
            unet = json.load(fh)
        with open(os.path.join(src, "vae", "config.json")) as fh:
            vae = json.load(fh)
    except (OSError, ValueError):
        return None
    return (unet, vae) if isinstance(unet, dict) and isinstance(vae, dict) else None


def native_size(model, config=None) -> tuple[int, int] | None:
    """(native height/width in pixels, VAE factor) of a local diffusers folder or single file (read_configs), or
    None."""
    configs = read_configs(model, config)
    try:
        return None if configs is None else native_from_configs(*configs)
    except (KeyError, TypeError):
        return None


def unet_inputs(model, config=None) -> tuple[int, int] | None:
    """(the UNet's input channels, the VAE's latent channels) of a local diffusers folder or single file
    (read_configs), or None."""
    configs = read_configs(model, config)
    return None if configs is None else (configs[0].get("in_channels", 4), configs[1].get("latent_channels", 4))


def is_edit_model(model, config=None) -> bool:
    """Whether a local diffusers folder or single file is an InstructPix2Pix model (its UNet takes twice the VAE's
    latent channels); False for a hub id or an unreadable folder or file."""
    inputs = unet_inputs(model, config)
    return inputs is not None and inputs[0] == 2 * inputs[1]


def is_inpainting_model(model, config=None) -> bool:
    """Whether a local diffusers folder or single file is an inpainting model (its UNet takes the latents, the mask
    and the masked photo's latents: twice the VAE's latent channels plus one); False for a hub id or an unreadable
    folder or file."""
    inputs = unet_inputs(model, config)
    return inputs is not None and inputs[0] == 2 * inputs[1] + 1


def native_from_configs(unet_config, vae_config) -> tuple[int, int]:
    """(native height/width in pixels, VAE factor) from the UNet's and the VAE's configs (dicts or diffusers'
    FrozenDicts): sample_size x 2^(len(block_out_channels) - 1)."""
    sample = unet_config["sample_size"]
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    return int(sample) * factor, factor


def check_size(height, width, native: int, factor: int, max_size: int | None = None,
               flag: str = "--max-size (CLI) / max_size= (Python)") -> tuple[int, int]:
    """-> (height, width), None meaning the native size. Each must be a positive multiple of the VAE factor and at
    most `max_size` (default: native x MAX_SIZE_FACTOR), so a typo cannot start hours of work. `flag`: the knob
    that raises the limit, in the caller's words (the server names its own)."""
    height, width = height or native, width or native
    limit = max_size if max_size is not None else native * MAX_SIZE_FACTOR
    if height <= 0 or width <= 0 or height % factor or width % factor:
        raise EngineError(f"height and width must be positive multiples of the VAE factor {factor}, got {height}x{width}")
    if max(height, width) > limit:
        why = f"{MAX_SIZE_FACTOR}x the model's native {native}" if max_size is None else "max_size"
        raise EngineError(f"size {height}x{width} is over the maximum {limit} px ({why}): ask for at most {limit}, "
                          f"or raise the limit with {flag}")
    return height, width


def load_base(model, dtype: torch.dtype, config=None):
    """-> dict of unet, vae, text_encoder, tokenizer, scheduler from a diffusers SD folder or hub id, or from a
    single-file original-layout checkpoint (load_single_file; `config` is for that case only)."""
    if is_checkpoint_file(model):
        return load_single_file(model, dtype, config)
    # deferred: diffusers and transformers are heavy; the command line imports this module before any loads
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    src = resolve(model, "base model")
    if config is not None:
        raise EngineError(f"config= names the configs of a single-file checkpoint (.safetensors/.ckpt); the base "
                          f"model {src} is a diffusers folder (or hub id) with its own: drop config= (--model-config)")
    if os.path.isdir(src):
        missing = [p for p in BASE_PARTS if not os.path.isdir(os.path.join(src, p))]
        if missing:
            raise EngineError(f"base model {src} is not a diffusers Stable Diffusion folder: missing {', '.join(missing)}/")
    parts = {
        "unet": load_part(f"UNet from {src}", UNet2DConditionModel.from_pretrained, src, subfolder="unet",
                          torch_dtype=dtype),
        "vae": load_part(f"VAE from {src}", AutoencoderKL.from_pretrained, src, subfolder="vae", torch_dtype=dtype),
        "text_encoder": load_part(f"text encoder from {src}", CLIPTextModel.from_pretrained, src,
                                  subfolder="text_encoder", torch_dtype=dtype),
        "tokenizer": load_part(f"tokenizer from {src}", CLIPTokenizer.from_pretrained, src, subfolder="tokenizer"),
        "scheduler": folder_scheduler(src),
    }
    if is_sdxl_folder(src):  # SDXL: the second text encoder (with its pooled projection) and its tokenizer
        from transformers import CLIPTextModelWithProjection  # deferred: transformers is heavy
        parts["text_encoder_2"] = load_part(f"second text encoder from {src}",
                                            CLIPTextModelWithProjection.from_pretrained, src,
                                            subfolder="text_encoder_2", torch_dtype=dtype)
        parts["tokenizer_2"] = load_part(f"second tokenizer from {src}", CLIPTokenizer.from_pretrained, src,
                                         subfolder="tokenizer_2")
    elif parts["unet"].config.get("addition_embed_type") == "text_time":
        raise EngineError(f"base model {src} has an SDXL UNet (added text/time conditioning) but no text_encoder_2/ "
                          "and tokenizer_2/: an SDXL model is a diffusers StableDiffusionXLPipeline folder")
    return parts


def _image_processor_class():
    # deferred: transformers is heavy
    try:  # transformers 5: the PIL implementation, no torchvision needed
        from transformers import CLIPImageProcessorPil as cls
    except ImportError:
        from transformers import CLIPImageProcessor as cls
    return cls


def _crop(processor) -> tuple[int, int]:
    cs = processor.crop_size
    return (cs["height"], cs["width"]) if isinstance(cs, dict) else (cs.height, cs.width)


def load_image_encoder(path, dtype: torch.dtype):
    """-> (CLIPVisionModelWithProjection, its image processor); CLIP's 224 defaults when no config is saved."""
    from transformers import CLIPVisionModelWithProjection  # deferred: transformers is heavy

    src = resolve(path, "image encoder")
    encoder = load_part(f"image encoder from {src}", CLIPVisionModelWithProjection.from_pretrained, src,
                        torch_dtype=dtype)
    cls = _image_processor_class()
    if os.path.isdir(src) and not os.path.isfile(os.path.join(src, "preprocessor_config.json")):
        processor = cls()
    else:
        processor = load_part(f"image processor from {src}", cls.from_pretrained, src)
    want = encoder.config.image_size
    if _crop(processor) != (want, want):
        raise EngineError(f"image processor crops to {_crop(processor)} but the image encoder at {src} expects "
                          f"{want}x{want}: save a matching preprocessor_config.json beside it")
    return encoder, processor


SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    # few-step sampling with an LCM-LoRA / LCM model (4-8 steps, guidance 1-2) and TCD (its LoRAs likewise)
    "lcm": "LCMScheduler",
    "tcd": "TCDScheduler",
}


_PROTOTYPES: dict = {}  # (scheduler class, frozen config) -> a never-used instance to copy (from_config: ~2 ms)


def make_scheduler(base, name: str | None = None):
    """A fresh scheduler for one call: the model's own (`name` None or "default") or one of SCHEDULERS. A copy of a
    cached unused instance built from the same class and config, which is what from_config would give, without
    from_config's signature inspection on every request."""
    from diffusers import schedulers as dsched  # deferred: diffusers is heavy

    if name in (None, "default"):
        cls = type(base)
    elif name not in SCHEDULERS:
        raise EngineError(f"unknown scheduler {name!r}; choose one of default, {', '.join(SCHEDULERS)}")
    else:
        cls = getattr(dsched, SCHEDULERS[name])
    try:
        key = (cls, tuple(sorted((k, repr(v)) for k, v in dict(base.config).items())))
    except Exception:  # an unusual config: no cache
        return cls.from_config(base.config)
    if key not in _PROTOTYPES:
        if len(_PROTOTYPES) > 64:
            _PROTOTYPES.clear()
        _PROTOTYPES[key] = cls.from_config(base.config)
    return copy.deepcopy(_PROTOTYPES[key])


def load_image(image, what: str = "condition image") -> Image.Image:
    """A PIL image or an image path -> RGB; a missing or unreadable file is one EngineError naming `what`."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                return im.convert("RGB")
        except FileNotFoundError:
            raise EngineError(f"{what} not found: {os.fspath(image)}") from None
        except OSError as e:
            raise EngineError(f"cannot read {what} {os.fspath(image)}: {e}") from e
    raise EngineError(f"{what} must be a PIL image or a path, got {type(image).__name__}")
