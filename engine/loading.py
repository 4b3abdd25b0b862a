"""Loading the pieces users already have on disk (or on the hub, when online), with one-line errors.

Light at import (no torch or diffusers until a loader runs): the command line checks sizes and paths with it
before anything heavy loads.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import TYPE_CHECKING

from PIL import Image

from . import MAX_SIZE_FACTOR
from .errors import EngineError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

BASE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve(path_or_id, what: str) -> str:
    """A local folder, or a hub id ("org/name") left for from_pretrained to fetch."""
    p = os.path.expanduser(os.fspath(path_or_id))
    if os.path.exists(p):
        if not os.path.isdir(p):
            raise EngineError(f"{what} must be a folder, got a file: {p}")
        return p
    if HUB_ID.match(p) and not p.startswith("."):
        return p
    raise EngineError(f"{what} not found: {p}")


def read_configs(model) -> tuple[dict, dict] | None:
    """(unet/config.json, vae/config.json) of a local diffusers folder, without loading weights; None when `model`
    is not a local folder with both (a hub id: the pipeline checks once it has loaded)."""
    src = os.path.expanduser(os.fspath(model))
    try:
        with open(os.path.join(src, "unet", "config.json")) as fh:
            unet = json.load(fh)
        with open(os.path.join(src, "vae", "config.json")) as fh:
            vae = json.load(fh)
    except (OSError, ValueError):
        return None
    return (unet, vae) if isinstance(unet, dict) and isinstance(vae, dict) else None


def native_size(model) -> tuple[int, int] | None:
    """(native height/width in pixels, VAE factor) of a local diffusers folder (read_configs), or None."""
    configs = read_configs(model)
    try:
        return None if configs is None else native_from_configs(*configs)
    except (KeyError, TypeError):
        return None


def is_edit_model(model) -> bool:
    """Whether a local diffusers folder is an InstructPix2Pix model (its UNet takes twice the VAE's latent
    channels); False for a hub id or an unreadable folder."""
    configs = read_configs(model)
    return configs is not None and configs[0].get("in_channels") == 2 * configs[1].get("latent_channels", 4)


def native_from_configs(unet_config, vae_config) -> tuple[int, int]:
    """(native height/width in pixels, VAE factor) from the UNet's and the VAE's configs (dicts or diffusers'
    FrozenDicts): sample_size x 2^(len(block_out_channels) - 1)."""
    sample = unet_config["sample_size"]
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    return int(sample) * factor, factor


def check_size(height, width, native: int, factor: int, max_size: int | None = None) -> tuple[int, int]:
    """-> (height, width), None meaning the native size. Each must be a positive multiple of the VAE factor and at
    most `max_size` (default: native x MAX_SIZE_FACTOR), so a typo cannot start hours of work."""
    height, width = height or native, width or native
    limit = max_size if max_size is not None else native * MAX_SIZE_FACTOR
    if height <= 0 or width <= 0 or height % factor or width % factor:
        raise EngineError(f"height and width must be positive multiples of the VAE factor {factor}, got {height}x{width}")
    if max(height, width) > limit:
        why = f"{MAX_SIZE_FACTOR}x the model's native {native}" if max_size is None else "max_size"
        raise EngineError(f"size {height}x{width} is over the maximum {limit} px ({why}): ask for at most {limit}, "
                          f"or raise the limit with --max-size (CLI) / max_size= (Python)")
    return height, width


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _load(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except EngineError:
        raise
    except Exception as e:  # from_pretrained raises OSError, ValueError, JSON and safetensors errors
        raise EngineError(f"cannot load {what}: {_first_line(e)}") from e


def load_base(model, dtype: torch.dtype):
    """-> dict of unet, vae, text_encoder, tokenizer, scheduler from a diffusers SD folder or hub id."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers import schedulers as dsched
    from transformers import CLIPTextModel, CLIPTokenizer

    src = resolve(model, "base model")
    if os.path.isdir(src):
        missing = [p for p in BASE_PARTS if not os.path.isdir(os.path.join(src, p))]
        if missing:
            raise EngineError(f"base model {src} is not a diffusers Stable Diffusion folder: missing {', '.join(missing)}/")
    parts = {
        "unet": _load(f"UNet from {src}", UNet2DConditionModel.from_pretrained, src, subfolder="unet", torch_dtype=dtype),
        "vae": _load(f"VAE from {src}", AutoencoderKL.from_pretrained, src, subfolder="vae", torch_dtype=dtype),
        "text_encoder": _load(f"text encoder from {src}", CLIPTextModel.from_pretrained, src,
                              subfolder="text_encoder", torch_dtype=dtype),
        "tokenizer": _load(f"tokenizer from {src}", CLIPTokenizer.from_pretrained, src, subfolder="tokenizer"),
    }
    config = _load(f"scheduler config from {src}", dsched.DDIMScheduler.load_config, src, subfolder="scheduler")
    cls = getattr(dsched, config.get("_class_name", ""), None)
    if cls is None:
        raise EngineError(f"unknown scheduler class {config.get('_class_name')!r} in {src}/scheduler")
    parts["scheduler"] = cls.from_config(config)
    return parts


def _image_processor_class():
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
    from transformers import CLIPVisionModelWithProjection

    src = resolve(path, "image encoder")
    encoder = _load(f"image encoder from {src}", CLIPVisionModelWithProjection.from_pretrained, src, torch_dtype=dtype)
    cls = _image_processor_class()
    if os.path.isdir(src) and not os.path.isfile(os.path.join(src, "preprocessor_config.json")):
        processor = cls()
    else:
        processor = _load(f"image processor from {src}", cls.from_pretrained, src)
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


def make_scheduler(base, name: str | None = None):
    """A fresh scheduler for one call: the model's own (`name` None or "default") or one of SCHEDULERS."""
    from diffusers import schedulers as dsched

    if name in (None, "default"):
        return type(base).from_config(base.config)
    if name not in SCHEDULERS:
        raise EngineError(f"unknown scheduler {name!r}; choose one of default, {', '.join(SCHEDULERS)}")
    return getattr(dsched, SCHEDULERS[name]).from_config(base.config)


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
