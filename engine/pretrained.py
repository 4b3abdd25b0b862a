"""`Pipeline.from_pretrained`'s work: what a caller names (a model folder or file, an image encoder, adapter files,
ControlNets, a device and dtype, a runtime) checked cheaply first, then loaded, fitted to each other, and handed to
the class the model kind runs on (engine/registry.py: an SDXL folder opens as SDXLPipeline whatever class was asked;
backend tensorrt opens the engines of `python -m export trt`)."""
from __future__ import annotations

import os

import torch

from ipadapter_instruct.engine import DTYPE_NAMES, RUNTIMES
from ipadapter_instruct.engine.adapter import load_adapter
from ipadapter_instruct.engine.controlnet import load_controlnets
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.loading import load_base, load_image_encoder, resolve
from ipadapter_instruct.engine.model_folders import index_flag
from ipadapter_instruct.engine.preflight import check_load
from ipadapter_instruct.engine.registry import pipeline_class
from ipadapter_instruct.engine.trt import check_choice

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise EngineError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def one_dtype(dtype, torch_dtype):
    """dtype= and diffusers' torch_dtype= are one argument: -> the torch.dtype given (None if neither)."""
    if dtype is not None and torch_dtype is not None and as_dtype(dtype) != as_dtype(torch_dtype):
        raise EngineError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree: give one (torch_dtype is "
                          "diffusers' name for dtype)")
    given = torch_dtype if dtype is None else dtype
    return None if given is None else as_dtype(given)


def check_channels(unet_channels: int, latent_channels: int, edit: bool) -> None:
    """A text-to-image UNet takes the latents alone; an inpainting one the latents, mask and masked-image latent; an
    InstructPix2Pix one the latents and the image latent."""
    if edit and unet_channels == latent_channels:
        raise EngineError(f"this is a text-to-image model ({unet_channels} UNet input channels); editing needs an "
                          f"InstructPix2Pix model ({2 * latent_channels} channels): generate with Pipeline / "
                          "`python -m engine generate`")
    if not edit and unet_channels == 2 * latent_channels:
        raise EngineError(f"this is an InstructPix2Pix model ({unet_channels} UNet input channels: latents + image "
                          "latent): edit with EditPipeline / `python -m engine edit`")
    if edit and unet_channels == 2 * latent_channels + 1:
        raise EngineError(f"this is an inpainting model ({unet_channels} UNet input channels: latents + mask + masked "
                          "image): inpaint with Pipeline(init_image=, mask_image=) / `generate --init-image --mask`")
    if unet_channels not in ((2 * latent_channels,) if edit else (latent_channels, 2 * latent_channels + 1)):
        raise EngineError(f"the UNet takes {unet_channels} input channels and the VAE makes {latent_channels}: "
                          "not a Stable Diffusion text-to-image, inpainting or InstructPix2Pix model")


def check_backend(backend, trt, engines, config, several: bool, controlnet) -> None:
    """The runtime arguments, before anything loads."""
    if backend not in RUNTIMES:
        raise EngineError(f"unknown backend {backend!r}; choose one of {', '.join(RUNTIMES)}")
    if check_choice(trt) != "auto" and backend != "tensorrt":
        raise EngineError(f"trt={trt!r} chooses the TensorRT of backend='tensorrt' (--backend tensorrt); the "
                          f"{backend} backend runs without one: drop it")
    if backend == "tensorrt":
        if config is not None:
            raise EngineError("config= is for a single-file model on the PyTorch backend; the TensorRT engines "
                              "carry their own")
        if several:
            raise EngineError("the TensorRT engines hold one adapter: several adapters run on the PyTorch backend")
        if controlnet is not None:
            raise EngineError("the TensorRT engines carry their ControlNets (exported with `python -m export onnx "
                              "--controlnet DIR`): drop controlnet=")
    elif engines is not None:
        raise EngineError("engines= is for backend='tensorrt'")


def load_adapters(files: list, image_encoder, parts: dict, dtype) -> tuple:
    """-> (image encoder, its processor, the adapters), each adapter checked against the encoders' widths."""
    if not files:
        return None, None, []
    encoder, processor = load_image_encoder(image_encoder, dtype)
    loaded = []
    for f in files:
        one = load_adapter(f, parts["unet"])
        # a plain IP-Adapter reads the projected, pooled embedding; the others the hidden states
        width = encoder.config.projection_dim if one.kind == "plain" else encoder.config.hidden_size
        if one.projector.config.image_dim != width:
            raise EngineError(f"adapter {os.fspath(f)} expects {one.projector.config.image_dim}-wide image tokens "
                              f"but the image encoder makes {width}-wide ones")
        text_dim = one.projector.config.text_dim
        if text_dim is not None and text_dim != parts["text_encoder"].config.hidden_size:
            raise EngineError(f"adapter {os.fspath(f)} expects {text_dim}-wide instruction tokens but the text "
                              f"encoder makes {parts['text_encoder'].config.hidden_size}-wide ones")
        loaded.append(one)
    return encoder, processor, loaded


def kind_class(cls, parts: dict, model):
    """The class that runs the loaded parts: SDXL parts open as the SDXL class; nothing else changes kind."""
    if "text_encoder_2" in parts:  # an SDXL folder: engine/sdxl.py
        if cls.KIND != "sdxl" and cls is not pipeline_class("sd15"):
            raise EngineError(f"{os.fspath(model)} is an SDXL model; {cls.__name__} runs SD1.5-layout models")
        return pipeline_class("sdxl")
    if cls.KIND == "sdxl":
        raise EngineError(f"{os.fspath(model)} is not an SDXL folder (no text_encoder_2/ and tokenizer_2/)")
    return cls


def from_pretrained(cls, model, image_encoder=None, adapter=None, device=None, dtype=None, attention_backend="auto",
                    backend="pytorch", engines=None, controlnet=None, config=None, trt="auto",
                    verify_fast_path: bool = True, torch_dtype=None):
    """`Pipeline.from_pretrained` (its docstring says what each argument takes)."""
    dtype = one_dtype(dtype, torch_dtype)
    several = isinstance(adapter, (list, tuple))
    if several and len(adapter) == 1:
        adapter, several = adapter[0], False
    check_backend(backend, trt, engines, config, several, controlnet)
    if backend == "tensorrt":
        return pipeline_class("sd15", "tensorrt").open_engines(model, image_encoder, adapter, device, dtype,
                                                               engines, trt)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError("device cuda requested but no CUDA GPU is available")
    dtype = as_dtype(dtype or ("float16" if device.type == "cuda" else "float32"))
    files = list(adapter) if several else ([] if adapter is None else [adapter])
    if several and not files:
        raise EngineError("adapter= is an empty list: give adapter files, or None for text to image")
    if files:  # the cheap checks first, before gigabytes of base weights load
        if image_encoder is None:
            raise EngineError("an adapter needs its image encoder: pass image_encoder= (a CLIP vision folder)")
        for f in files:
            if not os.path.isfile(f):
                raise EngineError(f"adapter file not found: {os.fspath(f)}")
        resolve(image_encoder, "image encoder")
    check_load(model, config, cls.KIND, controlnet or ())  # the kind and the ControlNets' fit, from their configs
    parts = load_base(model, dtype, config=config)
    cls = kind_class(cls, parts, model)
    if cls.KIND == "sdxl":  # a refiner-like model: an aesthetic score in its time ids (engine/sdxl.py)
        parts["requires_aesthetics_score"] = index_flag(model, "requires_aesthetics_score")
    encoder, processor, loaded = load_adapters(files, image_encoder, parts, dtype)
    nets = None if controlnet is None else load_controlnets(controlnet, parts["unet"], dtype,
                                                                 2 ** (len(parts["vae"].config.block_out_channels) - 1))
    return cls(**parts, image_encoder=encoder, image_processor=processor,
               adapter=(loaded if several else loaded[0]) if loaded else None, device=device, dtype=dtype,
               attention_backend=attention_backend, controlnets=nets, verify_fast_path=verify_fast_path)
