"""Loading the pieces users already have on disk (or on the hub, when online), with one-line errors.

Light at import (no torch or diffusers until a loader runs): the command line checks sizes and paths with it
before anything heavy loads. The base model is a diffusers folder (or hub id), or one original-layout checkpoint
file (.safetensors / .ckpt, as A1111 and ComfyUI keep SD1.5, InstructPix2Pix and SDXL base) read by diffusers'
`from_single_file` with local configs only: a diffusers folder the user names, or the ones shipped in configs/.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
from typing import TYPE_CHECKING

from PIL import Image

from . import MAX_SIZE_FACTOR
from .errors import EngineError
from .safe_load import first_line as _first_line
from .safe_load import load_error, load_pickle

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

BASE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

CHECKPOINT_EXTS = (".safetensors", ".ckpt")
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
KINDS = ("sd15", "ip2p", "sdxl")  # a single file's kind = the shipped configs/ folder it loads with, without config=
CONFIG_PARTS = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer",
                "scheduler/scheduler_config.json")
SDXL_CONFIG_PARTS = ("text_encoder_2/config.json", "tokenizer_2")
# the original (LDM, and SDXL's SGM) layout's parts, under the prefixes diffusers' single-file converters read
LDM_PARTS = {"UNet": ("model.diffusion_model.",), "VAE": ("first_stage_model.", "vae."),
             "text encoder": ("cond_stage_model.transformer.",)}
SDXL_TEXT = "conditioner.embedders.0.transformer."   # CLIP ViT-L/14, in transformers' layout
SDXL_TEXT_2 = "conditioner.embedders.1.model."       # OpenCLIP ViT-bigG/14, in OpenCLIP's layout
SDXL_PARTS = {**LDM_PARTS, "text encoder": (SDXL_TEXT,), "second text encoder": (SDXL_TEXT_2,)}
LDM_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
OTHER_FAMILIES = {"conditioner.embedders.0.model.": "an SDXL refiner checkpoint (OpenCLIP only)",
                  "cond_stage_model.model.": "an SD2 checkpoint (OpenCLIP)"}


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


def is_edit_model(model, config=None) -> bool:
    """Whether a local diffusers folder or single file is an InstructPix2Pix model (its UNet takes twice the VAE's
    latent channels); False for a hub id or an unreadable folder or file."""
    configs = read_configs(model, config)
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


def _load(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except EngineError:
        raise
    except Exception as e:  # from_pretrained raises OSError, ValueError, JSON and safetensors errors
        folder = args[0] if args and isinstance(args[0], (str, os.PathLike)) else None
        raise load_error(what, e, folder) from e


def load_base(model, dtype: torch.dtype, config=None):
    """-> dict of unet, vae, text_encoder, tokenizer, scheduler from a diffusers SD folder or hub id, or from a
    single-file original-layout checkpoint (load_single_file; `config` is for that case only)."""
    if is_checkpoint_file(model):
        return load_single_file(model, dtype, config)
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
        "unet": _load(f"UNet from {src}", UNet2DConditionModel.from_pretrained, src, subfolder="unet", torch_dtype=dtype),
        "vae": _load(f"VAE from {src}", AutoencoderKL.from_pretrained, src, subfolder="vae", torch_dtype=dtype),
        "text_encoder": _load(f"text encoder from {src}", CLIPTextModel.from_pretrained, src,
                              subfolder="text_encoder", torch_dtype=dtype),
        "tokenizer": _load(f"tokenizer from {src}", CLIPTokenizer.from_pretrained, src, subfolder="tokenizer"),
        "scheduler": _scheduler(src),
    }
    if is_sdxl_folder(src):  # SDXL: the second text encoder (with its pooled projection) and its tokenizer
        from transformers import CLIPTextModelWithProjection
        parts["text_encoder_2"] = _load(f"second text encoder from {src}", CLIPTextModelWithProjection.from_pretrained,
                                        src, subfolder="text_encoder_2", torch_dtype=dtype)
        parts["tokenizer_2"] = _load(f"second tokenizer from {src}", CLIPTokenizer.from_pretrained, src,
                                     subfolder="tokenizer_2")
    elif parts["unet"].config.get("addition_embed_type") == "text_time":
        raise EngineError(f"base model {src} has an SDXL UNet (added text/time conditioning) but no text_encoder_2/ "
                          "and tokenizer_2/: an SDXL model is a diffusers StableDiffusionXLPipeline folder")
    return parts


def is_sdxl_folder(src) -> bool:
    """Whether a local diffusers folder is an SDXL one (a second text encoder and tokenizer beside the first)."""
    return all(os.path.isdir(os.path.join(src, p)) for p in ("text_encoder_2", "tokenizer_2"))


def _scheduler(src: str):
    """The scheduler of a diffusers folder (or hub id), of the class its scheduler_config.json names."""
    from diffusers import schedulers as dsched

    config = _load(f"scheduler config from {src}", dsched.DDIMScheduler.load_config, src, subfolder="scheduler")
    cls = getattr(dsched, config.get("_class_name", ""), None)
    if cls is None:
        raise EngineError(f"unknown scheduler class {config.get('_class_name')!r} in {src}/scheduler")
    return cls.from_config(config)


def is_checkpoint_file(model) -> bool:
    """Whether `model` names a single-file checkpoint (.safetensors / .ckpt), there or not, rather than a folder."""
    path = os.path.expanduser(os.fspath(model))
    return path.endswith(CHECKPOINT_EXTS) and not os.path.isdir(path)


def checkpoint_shapes(path) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a single-file checkpoint without reading its weights: the safetensors header, or a .ckpt's
    pickle mapped to the meta device (nested "state_dict"s unwrapped, as diffusers' loader does)."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise EngineError(f"base model file not found: {path}")
    try:
        if path.endswith(".safetensors"):  # by extension, as diffusers' loader tells them apart
            from safetensors import safe_open
            with safe_open(path, framework="np") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        state = load_pickle(path, "checkpoint", map_location="meta")
        while isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}
    except EngineError:
        raise
    except Exception as e:  # a truncated or foreign file: safetensors' error
        raise EngineError(f"cannot read checkpoint {path}: {_first_line(e)}") from e


def checkpoint_kind(path: str, shapes: dict) -> str:
    """An original-layout checkpoint's kind: "sd15" (UNet input conv over 4 channels), "ip2p" (InstructPix2Pix, 8)
    or "sdxl" (SDXL base layout: conditioner.embedders.0/1, 4 channels); anything else is an EngineError saying
    what the file is."""
    for prefix, what in OTHER_FAMILIES.items():
        if any(k.startswith(prefix) for k in shapes):
            raise EngineError(f"{path} is {what}: single files load for SD1.5, InstructPix2Pix and SDXL base")
    sdxl = any(k.startswith("conditioner.") for k in shapes)
    parts = SDXL_PARTS if sdxl else LDM_PARTS
    missing = [part for part, prefixes in parts.items() if not any(k.startswith(prefixes) for k in shapes)]
    if missing:
        what = "SDXL" if sdxl else "SD1.5 / InstructPix2Pix"
        raise EngineError(f"{path} is not an original-layout {what} checkpoint: it has no "
                          f"{', '.join(missing)} weights ({', '.join(parts[p][0] + '*' for p in missing)})")
    conv = shapes.get(LDM_CONV_IN, ())
    channels = conv[1] if len(conv) == 4 else None
    if sdxl and channels != 4:
        raise EngineError(f"{path}: the SDXL UNet's input conv ({LDM_CONV_IN}) takes {channels} channels; SDXL base "
                          "takes 4 (9 is an inpainting model, not supported)")
    if channels not in (4, 8):
        raise EngineError(f"{path}: the UNet's input conv ({LDM_CONV_IN}) takes {channels} channels; SD1.5 takes 4 "
                          "and InstructPix2Pix 8 (9 is an inpainting model, not supported)")
    return "sdxl" if sdxl else "ip2p" if channels == 8 else "sd15"


def config_folder(path: str, kind: str, config=None) -> str:
    """The folder a single file's configs, tokenizer and scheduler come from: `config` (a local diffusers folder
    of the same kind of model, checked part by part), else the shipped SD1.5, InstructPix2Pix or SDXL one."""
    if config is None:
        return os.path.join(CONFIGS, kind)
    folder = os.path.expanduser(os.fspath(config))
    if not os.path.isdir(folder):
        raise EngineError(f"config folder not found: {folder} (a local diffusers folder of the checkpoint's model)")
    missing = [p for p in CONFIG_PARTS if not os.path.exists(os.path.join(folder, p))]
    if missing:
        raise EngineError(f"config folder {folder} is not a diffusers Stable Diffusion folder: missing "
                          f"{', '.join(missing)}")
    if (kind == "sdxl") != is_sdxl_folder(folder):
        raise EngineError(f"{path} is {'an SDXL' if kind == 'sdxl' else 'an SD1.5-layout'} checkpoint but the config "
                          f"folder {folder} is {'not ' if kind == 'sdxl' else ''}an SDXL one (text_encoder_2/, "
                          "tokenizer_2/): name a config folder of the same kind of model")
    edit = kind == "ip2p"
    try:
        with open(os.path.join(folder, "unet", "config.json")) as fh:
            channels = json.load(fh).get("in_channels")
    except (OSError, ValueError, AttributeError) as e:
        raise EngineError(f"cannot read {folder}/unet/config.json: {_first_line(e)}") from e
    want = 8 if edit else 4
    if channels != want:
        raise EngineError(f"{path} is {'an InstructPix2Pix' if edit else 'a text-to-image SD1.5'} checkpoint ({want} "
                          f"UNet input channels) but the config folder {folder} has a {channels}-channel UNet: name "
                          "a config folder of the same kind of model")
    return folder


def _key_problems(part: str, model, converted: dict) -> str | None:
    """What differs between a meta model's state dict and the checkpoint's keys for it, in one phrase."""
    want = model.state_dict()
    recomputed = {name for name, _ in model.named_buffers()} - set(want)  # e.g. CLIP's position ids, often saved
    misshaped = [f"{k} {tuple(converted[k].shape)} vs {tuple(want[k].shape)}"
                 for k in sorted(set(want) & set(converted)) if converted[k].shape != want[k].shape]
    missing = sorted(set(want) - set(converted))
    unexpected = sorted(set(converted) - set(want) - recomputed)
    found = [f"{len(keys)} {what} ({', '.join(keys[:2])}{', ...' if len(keys) > 2 else ''})"
             for what, keys in (("mis-shaped", misshaped), ("missing", missing), ("unexpected", unexpected)) if keys]
    return f"{part}: {', '.join(found)}" if found else None


def check_checkpoint_keys(path: str, shapes: dict, folder: str, shipped: bool) -> None:
    """The file's UNet, VAE and text-encoder keys, as diffusers' own single-file converters map them, must be the
    keys (and shapes) of the models `folder` configures, exactly; run on meta tensors, so no weight is read."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    try:
        with torch.device("meta"):
            state = {k: torch.empty(shape) for k, shape in shapes.items()}
            unet_config = UNet2DConditionModel.load_config(folder, subfolder="unet")
            vae_config = AutoencoderKL.load_config(folder, subfolder="vae")
            text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))
            clip = sfu.convert_ldm_clip_checkpoint(state)
            if not hasattr(text, "text_model"):  # transformers' flattened CLIPTextModel: diffusers strips it too
                clip = {k.removeprefix("text_model."): v for k, v in clip.items()}
            parts = [("UNet", UNet2DConditionModel.from_config(unet_config),
                      sfu.convert_ldm_unet_checkpoint(state, unet_config)),
                     ("VAE", AutoencoderKL.from_config(vae_config), sfu.convert_ldm_vae_checkpoint(state, vae_config)),
                     ("text encoder", text, clip)]
            if os.path.isdir(os.path.join(folder, "text_encoder_2")):  # SDXL: the second encoder, OpenCLIP's layout
                text_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2"))
                parts.append(("second text encoder", text_2,
                              sfu.convert_open_clip_checkpoint(text_2, state, prefix=SDXL_TEXT_2)))
    except Exception as e:  # a config that does not read, or blocks the converters look for and do not find
        raise EngineError(f"{path} does not convert with the configs in {folder}: {_first_line(e)}") from e
    problems = [p for p in (_key_problems(*part) for part in parts) if p]
    if problems:
        hint = ("a model of another size or layout: name its diffusers folder with config= or --model-config"
                if shipped else "is the config folder this model's?")
        raise EngineError(f"{path} does not match the configs in {folder} ({hint}): {'; '.join(problems)}")


def load_single_file(path, dtype: torch.dtype, config=None):
    """-> load_base's parts from an original-layout SD1.5 / InstructPix2Pix / SDXL base checkpoint, through diffusers'
    `StableDiffusion(InstructPix2Pix|XL)Pipeline.from_single_file(path, config=folder, local_files_only=True)`: the
    configs, tokenizer(s) and scheduler from `config` (a local diffusers folder) or the shipped configs; nothing is
    fetched. The header is checked first (kind, keys, shapes), so a wrong file fails before any weight loads."""
    from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    path = os.path.expanduser(os.fspath(path))
    shapes = checkpoint_shapes(path)
    kind = checkpoint_kind(path, shapes)
    folder = config_folder(path, kind, config)
    check_checkpoint_keys(path, shapes, folder, shipped=config is None)
    given = {}
    if config is None:  # the shipped configs share one tokenizer (CLIP ViT-L/14's, as every SD1.5-family model)
        tokenizer = os.path.join(CONFIGS, "tokenizer")
        given["tokenizer"] = _load(f"tokenizer from {tokenizer}", CLIPTokenizer.from_pretrained, tokenizer)
        if kind == "sdxl":  # SDXL's second tokenizer: the same BPE, padding with "!" (as its tokenizer_2/ says)
            given["tokenizer_2"] = _load(f"tokenizer from {tokenizer}", CLIPTokenizer.from_pretrained, tokenizer,
                                         pad_token="!")
    if kind == "sdxl":
        cls, extra = StableDiffusionXLPipeline, {}
    else:
        cls = StableDiffusionInstructPix2PixPipeline if kind == "ip2p" else StableDiffusionPipeline
        extra = dict(safety_checker=None, requires_safety_checker=False)
    pipe = _load(f"single-file checkpoint {path}", cls.from_single_file, path, config=folder,
                 local_files_only=True, torch_dtype=dtype, feature_extractor=None, **extra, **given)
    names = BASE_PARTS[:-1] + (("text_encoder_2", "tokenizer_2") if kind == "sdxl" else ())
    # the scheduler as a folder's (load_base): the class its config names, untouched by the pipeline's fix-ups
    return {**{name: getattr(pipe, name) for name in names}, "scheduler": _scheduler(folder)}


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


_PROTOTYPES: dict = {}  # (scheduler class, frozen config) -> a never-used instance to copy (from_config: ~2 ms)


def make_scheduler(base, name: str | None = None):
    """A fresh scheduler for one call: the model's own (`name` None or "default") or one of SCHEDULERS. A copy of a
    cached unused instance built from the same class and config, which is what from_config would give, without
    from_config's signature inspection on every request."""
    from diffusers import schedulers as dsched

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
