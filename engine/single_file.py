"""Single-file checkpoints: one original-layout file (.safetensors / .ckpt, as A1111 and ComfyUI keep SD1.5, its
inpainting model, InstructPix2Pix and SDXL base) read by diffusers' `from_single_file` with local configs only: a
diffusers folder the user names, or the ones shipped in configs/. The header is checked first (kind, keys, shapes),
so a wrong file is one line before any weight loads.

Light at import: torch, diffusers and transformers are imported by the readers and loaders only.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.model_folders import BASE_PARTS, folder_scheduler, is_sdxl_folder, load_part
from ipadapter_instruct.engine.safe_load import first_line, load_pickle

if TYPE_CHECKING:
    import torch

CHECKPOINT_EXTS = (".safetensors", ".ckpt")
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
KINDS = ("sd15", "ip2p", "inpaint", "sdxl")  # a single file's kind = the shipped configs/ folder it loads with, without config=
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
CHANNELS = {4: "sd15", 8: "ip2p", 9: "inpaint"}  # the UNet's input channels -> an SD1.5-layout file's kind
WHAT = {"sd15": "a text-to-image SD1.5", "ip2p": "an InstructPix2Pix", "inpaint": "an inpainting"}
OTHER_FAMILIES = {"conditioner.embedders.0.model.": "an SDXL refiner checkpoint (OpenCLIP only)",
                  "cond_stage_model.model.": "an SD2 checkpoint (OpenCLIP)"}


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
            from safetensors import safe_open  # deferred: only a .safetensors header needs it
            with safe_open(path, framework="np") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        state = load_pickle(path, "checkpoint", map_location="meta")
        while isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}
    except EngineError:
        raise
    except Exception as e:  # a truncated or foreign file: safetensors' error
        raise EngineError(f"cannot read checkpoint {path}: {first_line(e)}") from e


def checkpoint_kind(path: str, shapes: dict) -> str:
    """An original-layout checkpoint's kind: "sd15" (UNet input conv over 4 channels), "ip2p" (InstructPix2Pix, 8),
    "inpaint" (SD1.5 inpainting, 9: latents, mask, masked-photo latents) or "sdxl" (SDXL base layout:
    conditioner.embedders.0/1, 4 channels); anything else is an EngineError saying what the file is."""
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
    if sdxl and channels == 9:
        raise EngineError(f"{path} is an SDXL inpainting checkpoint (its UNet's input conv takes 9 channels): SDXL "
                          "inpainting single files are not supported: load its diffusers folder (e.g. "
                          "diffusers/stable-diffusion-xl-1.0-inpainting-0.1)")
    if sdxl and channels != 4:
        raise EngineError(f"{path}: the SDXL UNet's input conv ({LDM_CONV_IN}) takes {channels} channels; SDXL base "
                          "takes 4")
    if channels not in CHANNELS:
        raise EngineError(f"{path}: the UNet's input conv ({LDM_CONV_IN}) takes {channels} channels; SD1.5 takes 4, "
                          "InstructPix2Pix 8 and SD1.5 inpainting 9")
    return "sdxl" if sdxl else CHANNELS[channels]


def config_folder(path: str, kind: str, config=None) -> str:
    """The folder a single file's configs, tokenizer and scheduler come from: `config` (a local diffusers folder
    of the same kind of model, checked part by part), else the shipped SD1.5, InstructPix2Pix, inpainting or SDXL
    one."""
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
    try:
        with open(os.path.join(folder, "unet", "config.json")) as fh:
            channels = json.load(fh).get("in_channels")
    except (OSError, ValueError, AttributeError) as e:
        raise EngineError(f"cannot read {folder}/unet/config.json: {first_line(e)}") from e
    want = next((n for n, k in CHANNELS.items() if k == kind), 4)  # (SDXL base: 4)
    if channels != want:
        raise EngineError(f"{path} is {WHAT.get(kind, 'an SDXL')} checkpoint ({want} UNet input channels) but the config folder "
                          f"{folder} has a {channels}-channel UNet: name a config folder of the same kind of model")
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
    # deferred: torch, diffusers and transformers, for a file being loaded
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
        raise EngineError(f"{path} does not convert with the configs in {folder}: {first_line(e)}") from e
    problems = [p for p in (_key_problems(*part) for part in parts) if p]
    if problems:
        hint = ("a model of another size or layout: name its diffusers folder with config= or --model-config"
                if shipped else "is the config folder this model's?")
        raise EngineError(f"{path} does not match the configs in {folder} ({hint}): {'; '.join(problems)}")


def load_single_file(path, dtype: torch.dtype, config=None):
    """-> load_base's parts from an original-layout SD1.5 / InstructPix2Pix / SD1.5 inpainting / SDXL base checkpoint,
    through diffusers' `StableDiffusion(InstructPix2Pix|Inpaint|XL)Pipeline.from_single_file(path, config=folder,
    local_files_only=True)`: the configs, tokenizer(s) and scheduler from `config` (a local diffusers folder) or the
    shipped configs; nothing is fetched. The header is checked first (kind, keys, shapes), so a wrong file fails
    before any weight loads."""
    # deferred: diffusers and transformers, for a file being loaded
    from diffusers import (StableDiffusionInpaintPipeline, StableDiffusionInstructPix2PixPipeline,
                           StableDiffusionPipeline, StableDiffusionXLPipeline)
    from transformers import CLIPTokenizer

    path = os.path.expanduser(os.fspath(path))
    shapes = checkpoint_shapes(path)
    kind = checkpoint_kind(path, shapes)
    folder = config_folder(path, kind, config)
    check_checkpoint_keys(path, shapes, folder, shipped=config is None)
    given = {}
    if config is None:  # the shipped configs share one tokenizer (CLIP ViT-L/14's, as every SD1.5-family model)
        tokenizer = os.path.join(CONFIGS, "tokenizer")
        given["tokenizer"] = load_part(f"tokenizer from {tokenizer}", CLIPTokenizer.from_pretrained, tokenizer)
        if kind == "sdxl":  # SDXL's second tokenizer: the same BPE, padding with "!" (as its tokenizer_2/ says)
            given["tokenizer_2"] = load_part(f"tokenizer from {tokenizer}", CLIPTokenizer.from_pretrained,
                                             tokenizer, pad_token="!")
    if kind == "sdxl":
        cls, extra = StableDiffusionXLPipeline, {}
    else:
        cls = {"ip2p": StableDiffusionInstructPix2PixPipeline, "inpaint": StableDiffusionInpaintPipeline}.get(
            kind, StableDiffusionPipeline)
        extra = dict(safety_checker=None, requires_safety_checker=False)
    pipe = load_part(f"single-file checkpoint {path}", cls.from_single_file, path, config=folder,
                     local_files_only=True, torch_dtype=dtype, feature_extractor=None, **extra, **given)
    names = BASE_PARTS[:-1] + (("text_encoder_2", "tokenizer_2") if kind == "sdxl" else ())
    # the scheduler as a folder's (load_base): the class its config names, untouched by the pipeline's fix-ups
    return {**{name: getattr(pipe, name) for name in names}, "scheduler": folder_scheduler(folder)}

