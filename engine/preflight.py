"""Pre-flight: the mistakes that show before anything loads, each one EngineError line, from JSON configs and file
headers only (no torch, diffusers, transformers or triton, and no weight file read).

The commands call `check_config` before they import the pipeline, and `load_pipeline` calls it too:
- a missing path (a hub id, org/name, passes: it is the loader's when online; with HF_HUB_OFFLINE=1 it must be in
  the hub cache);
- a part of a model (its unet/, vae/, ... subfolder) given as the model;
- the wrong model kind for the command, read from unet/config.json and vae/config.json (or a .safetensors
  checkpoint's header);
- cuda asked for where there is none (a light probe: `cuda_absent`);
- an IPAdapter-Instruct adapter run without an instruction (the adapter file's key names: `adapter_kind`);
- a ControlNet that does not fit the UNet and VAE (`controlnet_misfit`, which engine/controlnet.py also runs on
  the loaded configs).
Anything these cheap reads cannot tell (a hub id, a .ckpt, an unreadable config) is left to the loader's checks.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import sys
import zipfile

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.loading import is_inpainting_model
from ipadapter_instruct.engine.model_folders import BASE_PARTS, HUB_ID, is_sdxl_folder
from ipadapter_instruct.engine.single_file import checkpoint_kind, checkpoint_shapes, is_checkpoint_file

# the folders of a diffusers pipeline that hold one part each: given as --model, the model is the folder above
PARTS = (*BASE_PARTS, "text_encoder_2", "tokenizer_2", "image_encoder", "feature_extractor", "safety_checker")
WHAT_RUNS = {"sd15": "a text-to-image SD1.5 model", "sdxl": "an SDXL model", "edit": "an InstructPix2Pix model"}
INSTRUCT_KEY = "proj_prompt_input"  # the projector's instruction path: only IPAdapter-Instruct has it
TRUE = ("1", "on", "yes", "true")


def hub_cache() -> str:
    """The Hugging Face hub cache folder, as huggingface_hub finds it (without importing it)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def check_path(path, what: str, folder: bool = True, kinds: str = "a local folder") -> str | None:
    """A local path that must exist -> it; a hub id ("org/name", not a local path) -> None when it may be fetched
    (online) or is cached (HF_HUB_OFFLINE=1); anything else is an EngineError naming what it should be."""
    p = os.path.expanduser(os.fspath(path))
    if os.path.exists(p):
        return p
    if folder and HUB_ID.match(p) and not p.startswith(".") and not is_checkpoint_file(p):
        if os.environ.get("HF_HUB_OFFLINE", "").lower() not in TRUE:
            return None
        if os.path.isdir(os.path.join(hub_cache(), "models--" + p.replace("/", "--"))):
            return None
        raise EngineError(f"{what} not found: {p} is no local path, and HF_HUB_OFFLINE=1 with no copy of that hub "
                          f"id in {hub_cache()}")
    raise EngineError(f"{what} not found: {p} ({kinds}{', or a hub id such as org/name' if folder else ''})")


def read_json(path: str) -> dict | None:
    try:
        with open(path) as fh:
            value = json.load(fh)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def check_not_a_part(p: str, what: str) -> None:
    """A folder holding one part of a diffusers model (unet/ and the like) named as the whole model."""
    if os.path.isfile(os.path.join(p, "model_index.json")) or os.path.isdir(os.path.join(p, "unet")):
        return
    parent = os.path.dirname(os.path.abspath(p))
    name = os.path.basename(os.path.normpath(p))
    own = (read_json(os.path.join(p, "config.json")) or {}).get("_class_name")
    if name in PARTS and (os.path.isfile(os.path.join(parent, "model_index.json"))
                          or os.path.isdir(os.path.join(parent, "unet"))):
        raise EngineError(f"{what} {p} is the {name}/ part of a model: pass the folder above it, {parent}")
    missing = [part for part in BASE_PARTS if not os.path.isdir(os.path.join(p, part))]
    if own:
        raise EngineError(f"{what} {p} holds one {own}, not a whole model: pass the diffusers folder that holds "
                          f"{', '.join(BASE_PARTS)}/")
    if missing:
        raise EngineError(f"{what} {p} is not a diffusers Stable Diffusion folder: missing {', '.join(missing)}/")


def folder_kind(p: str) -> tuple[str | None, dict | None, dict | None]:
    """(sd15 | sdxl | edit | None, unet config, vae config) of a local diffusers folder, from its JSON configs."""
    unet = read_json(os.path.join(p, "unet", "config.json"))
    vae = read_json(os.path.join(p, "vae", "config.json"))
    if unet is None or vae is None:
        return None, unet, vae
    if is_sdxl_folder(p) or unet.get("addition_embed_type") == "text_time":
        return "sdxl", unet, vae
    channels, latent = unet.get("in_channels", 4), vae.get("latent_channels", 4)
    kind = "edit" if channels == 2 * latent else "sd15" if channels in (latent, 2 * latent + 1) else None
    return kind, unet, vae


def model_kind(model, config=None, what: str = "base model") -> tuple[str | None, dict | None, dict | None]:
    """Check the model path and read its kind: -> (sd15 | sdxl | edit, or None when the configs cannot tell
    cheaply (a hub id, a .ckpt), its UNet config, its VAE config)."""
    p = check_path(model, what, kinds="a diffusers folder, a .safetensors/.ckpt checkpoint")
    if p is None:
        return None, None, None
    if os.path.isdir(p):
        check_not_a_part(p, what)
        return folder_kind(p)
    if not is_checkpoint_file(p):
        raise EngineError(f"{what} must be a diffusers folder or a .safetensors/.ckpt checkpoint, got the file {p}")
    if not p.endswith(".safetensors"):
        return None, None, None  # a .ckpt's keys need torch's unpickler: the loader reads them
    kind = checkpoint_kind(p, checkpoint_shapes(p))
    return {"ip2p": "edit", "inpaint": "sd15"}.get(kind, kind), None, None


def kind_error(model, found: str, want: str, inpaint: bool = False) -> str | None:
    """Why `found` cannot run as `want` (sd15 takes an SDXL folder too: it opens as SDXL), or None. inpaint: the
    model's UNet is an inpainting one (it runs as sd15, from a photo and a mask)."""
    if want == found or (want == "sd15" and found == "sdxl"):
        return None
    if inpaint:
        return (f"{model} is an inpainting model (its UNet reads the latents, a mask and the masked photo's latent), "
                f"not {'an InstructPix2Pix' if want == 'edit' else 'an SDXL'} one: inpaint with Pipeline(init_image=, "
                "mask_image=) / `python -m engine generate --init-image PHOTO --mask MASK`")
    if found == "edit":
        return (f"{model} is an InstructPix2Pix model (its UNet reads the latents and the photo's latent): edit "
                "with EditPipeline / `python -m engine edit` (serve: --kind edit)")
    if want == "edit":
        return (f"{model} is {WHAT_RUNS[found]}, not an InstructPix2Pix one (whose UNet reads the photo's latent "
                "too): generate with Pipeline / `python -m engine generate`, or edit with an InstructPix2Pix model")
    return f"{model} is {WHAT_RUNS[found]}, not an SDXL folder (no text_encoder_2/ and tokenizer_2/)"


def cuda_absent() -> str | None:
    """Why there is surely no CUDA device, read without importing torch (~2 s): CUDA_VISIBLE_DEVICES hiding every
    GPU, a CPU-only torch build (torch/version.py), or, on Linux, no /dev/nvidia* (nor WSL's /dev/dxg). None:
    there may be one (torch then decides, at load)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    spec = importlib.util.find_spec("torch")
    if spec is not None and spec.origin:
        try:
            with open(os.path.join(os.path.dirname(spec.origin), "version.py")) as fh:
                text = fh.read()
        except OSError:
            text = ""
        build = dict(re.findall(r"^(cuda|hip)\s*(?::[^=]*)?=\s*(.+?)\s*$", text, re.M))
        if build.get("cuda") == "None" and build.get("hip") == "None":
            version = re.search(r"^__version__\s*=\s*['\"](.+?)['\"]", text, re.M)
            return f"this torch ({version.group(1) if version else '?'}) is a CPU-only build"
    if sys.platform.startswith("linux") and not (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/dxg")
                                                 or os.path.exists("/dev/kfd")):
        return "no NVIDIA GPU device (/dev/nvidia0) on this machine"
    return None


def check_device(device) -> None:
    if device is not None and str(device).startswith("cuda"):
        why = cuda_absent()
        if why:
            raise EngineError(f"device {device} requested but no CUDA GPU is available ({why}): use --device cpu "
                              "(device='cpu'), or leave the device out to take cuda when present")


def adapter_kind(path) -> str | None:
    """instruct or plus|plain (a two-key adapter without the instruction path), from the key names only: a
    .safetensors header, or the pickle of a zip-format torch .bin (its key names are strings in data.pkl; the
    tensors live in other zip members and are not read). None when that cannot tell (a legacy .bin)."""
    p = os.fspath(path)
    try:
        if p.endswith(".safetensors"):
            from safetensors import safe_open  # light: the header only (no torch with framework "np")
            with safe_open(p, framework="np") as f:
                keys = " ".join(f.keys())
        elif zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as z:
                pickles = [n for n in z.namelist() if n.endswith("data.pkl")]
                keys = z.read(pickles[0]).decode("latin-1") if pickles else ""
        else:
            return None
    except Exception:  # unreadable: the loader names what is wrong
        return None
    return "instruct" if INSTRUCT_KEY in keys else "plus|plain"


def check_adapters(files, instruct=..., image_encoder=None) -> None:
    """Each adapter file exists; with `instruct` given (None or "": no instruction), an IPAdapter-Instruct one
    needs an instruction. `...` (the default): the instruction is not known yet (load time)."""
    for f in files:
        check_path(f, "adapter file", folder=False, kinds="a .bin or .safetensors file")
        if instruct is None and adapter_kind(f) == "instruct":  # a blank one: the call says "instruction is empty"
            raise EngineError(f"adapter {os.fspath(f)} is IPAdapter-Instruct, which reads an instruction: give "
                              "--instruct (instruct=), e.g. 'use the style of this image'")
    if files and image_encoder is not None:
        check_path(image_encoder, "image encoder")


def controlnet_misfit(net: dict, unet: dict, vae_factor: int | None) -> str | None:
    """What in a ControlNet's config does not fit the UNet's (and the VAE's downsampling), or None. Fields absent
    from a config are diffusers' defaults."""
    unet_defaults = {"block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 1280,
                     "layers_per_block": 2, "addition_embed_type": None}
    # a ControlNet reads the latents alone: an inpainting UNet's mask and masked-photo latent are not its input
    latents, reads = unet.get("out_channels", 4), net.get("in_channels", 4)
    problems = [] if reads == latents else [f"in_channels {reads} against the UNet's {latents} latent channels"]
    for field, default in unet_defaults.items():
        mine, theirs = net.get(field, default), unet.get(field, default)
        mine, theirs = [tuple(v) if isinstance(v, list) else v for v in (mine, theirs)]
        if mine != theirs:
            problems.append(f"{field} {mine} against the UNet's {theirs}")
    embedding = net.get("conditioning_embedding_out_channels", (16, 32, 96, 256))
    down = 2 ** (len(embedding) - 1)
    if vae_factor is not None and down != vae_factor:
        problems.append(f"its conditioning embedding ({len(embedding)} blocks) shrinks the control image {down}x "
                        f"but the latents are {vae_factor}x smaller than the image")
    if net.get("conditioning_channels", 3) != 3:
        problems.append(f"conditioning_channels {net['conditioning_channels']} (the control image is RGB: 3)")
    return "; ".join(problems) or None


def check_controlnets(paths, unet: dict | None, vae: dict | None) -> None:
    for path in paths:
        p = os.path.expanduser(os.fspath(path))
        if not os.path.isdir(p):
            raise EngineError(f"ControlNet folder not found: {p}")
        net = read_json(os.path.join(p, "config.json"))
        if net is None or unet is None:
            continue  # the loader names what is wrong with it
        factor = 2 ** (len(vae["block_out_channels"]) - 1) if vae and "block_out_channels" in vae else None
        misfit = controlnet_misfit(net, unet, factor)
        if misfit:
            raise EngineError(f"the ControlNet {p} does not fit this UNet: {misfit}")


def check_config(config, instruct=...) -> str | None:
    """Everything an EngineConfig (engine/registry.py) names that can be checked before loading; `instruct` as
    check_adapters takes it. -> the model kind read from its configs, or None when they cannot tell."""
    check_device(config.device)
    if config.backend != "pytorch":
        return None  # the engines folder carries its own models: the TensorRT loader checks it
    adapters = [config.adapter] if isinstance(config.adapter, (str, os.PathLike)) else list(config.adapter or ())
    check_adapters(adapters, instruct, config.image_encoder if adapters else None)
    if config.model is None:
        return None
    if config.model_config is not None:
        check_path(config.model_config, "model config folder")
    return check_load(config.model, config.model_config, config.kind, config.controlnet or ())


def check_load(model, config, kind: str | None, controlnets) -> str | None:
    """The model path, its kind against `kind` (None: any) and the ControlNets against its UNet and VAE, from
    their configs. -> the kind read, or None when the configs cannot tell."""
    found, unet, vae = model_kind(model, config)
    if found is not None and kind is not None and found != kind:
        why = kind_error(os.fspath(model), found, kind, found == "sd15" and is_inpainting_model(model, config))
        if why:
            raise EngineError(why)
    check_controlnets([controlnets] if isinstance(controlnets, (str, os.PathLike)) else controlnets, unet, vae)
    return found
