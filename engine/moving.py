"""`Pipeline.to`: diffusers' `pipe.to(device)`, `pipe.to(dtype)`, `pipe.to(device, dtype)`, `pipe.to(torch_dtype=)`.

Every module the pipeline holds moves: the UNet, VAE, text encoder(s), image encoder, each adapter's projector and
K/V layers, the ControlNets (a fused LoRA's saved base weights follow the device). What was made for the old device
and dtype is made again or refused: the attention kernels (and the fused projector, GroupNorm+SiLU and GEGLU) are
chosen again, CUDA graphs captured before are dropped (recaptured on use), a compiled UNet compiles again at its
next call, and the first-use checks of the graphs and compiled UNet run again. Refused: leaving CUDA with CUDA
graphs on, an attached encoder cache (its encodings are the old dtype's), and exported graphs (their device and dtype
are the export's).
"""
from __future__ import annotations

import logging

import torch

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.pretrained import DTYPES, one_dtype

log = logging.getLogger("ipadapter_instruct.engine.pipeline")


def to_args(args: tuple, kwargs: dict) -> tuple:
    """diffusers' ways to say where and in what -> (torch.device or None, torch.dtype or None)."""
    kwargs = dict(kwargs)
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    torch_dtype = kwargs.pop("torch_dtype", None)
    kwargs.pop("silence_dtype_warnings", None)  # (diffusers' flag: nothing to silence here)
    if kwargs:
        raise EngineError(f"to() takes a device and a dtype (device=, dtype=, torch_dtype=), not {', '.join(kwargs)}")
    for a in args:
        if isinstance(a, torch.dtype) or (isinstance(a, str) and a in DTYPES):
            if dtype is not None:
                raise EngineError(f"to() was given two dtypes: {dtype} and {a}")
            dtype = a
        elif device is None and isinstance(a, (str, int, torch.device)):
            device = a
        else:
            raise EngineError(f"to() takes a device and a dtype, e.g. to('cuda', torch.float16); got {a!r}")
    try:
        device = None if device is None else torch.device(device)
    except (RuntimeError, TypeError):
        raise EngineError(f"to(): {device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    return device, one_dtype(dtype, torch_dtype)


def modules(pipe) -> list:
    """Every module the pipeline runs (the exported graphs' pipelines hold none of these as modules)."""
    mods = [pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None), pipe.image_encoder]
    mods += [m for a in pipe.adapters for m in (a.projector, a.layers)] + list(pipe.controlnets)
    return [m for m in mods if m is not None]


def move(pipe, *args, **kwargs):
    """Move the pipeline's modules to a device and/or dtype (see the module's docstring). -> the pipeline."""
    device, dtype = to_args(args, kwargs)
    device = pipe.device if device is None else device
    dtype = pipe.dtype if dtype is None else dtype
    if device == pipe.device and dtype == pipe.dtype:
        return pipe
    if pipe.RUNTIME != "torch":
        raise EngineError(f"this pipeline runs exported {pipe.RUNTIME} graphs made for {pipe.device} and "
                          f"{str(pipe.dtype).removeprefix('torch.')}: to() moves PyTorch pipelines; export again "
                          "for another device or dtype")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError("to(): device cuda requested but no CUDA GPU is available")
    if pipe.encoder_cache is not None:
        raise EngineError("to(): an encoder cache is attached (its encodings are on the old device and dtype): "
                          "set_encoder_cache(None) first, and attach a new cache after the move")
    if pipe.uses_cuda_graphs and device.type != "cuda":
        raise EngineError(f"to({device}): CUDA graphs are on; enable_cuda_graphs(False) before leaving CUDA")
    for m in modules(pipe):
        m.to(device, dtype)
    snapshot = pipe.__dict__.get("_lora_snapshot")
    if snapshot:  # a fused LoRA's base weights, put back exactly when it is unfused (engine/lora.py)
        pipe.__dict__["_lora_snapshot"] = [(p, saved.to(device)) for p, saved in snapshot]
    pipe.device, pipe.dtype = device, dtype
    pipe.set_attention_backend(pipe.attention_backend)  # kernels for the new device and dtype; old graphs dropped
    if pipe._compiled:
        log.info("the UNet compiles again at the next call (moved to %s, %s)", device, dtype)
    return pipe
