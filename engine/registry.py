"""Model kinds and runtimes: one table from (kind, runtime) to the class that runs it, and what each can do.

A kind is the model's maths (sd15: text-to-image on an SD1.5-layout UNet, sdxl, edit: InstructPix2Pix); a runtime is
what executes its graphs (torch, onnx: ONNX Runtime, tensorrt). `pipe.kind`, `pipe.RUNTIME` and
`pipe.capabilities` answer what callers used to probe with getattr. Nothing heavy is imported here: the table holds
"module:Class" names, imported when a pipeline of that kind is opened.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, fields

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.loading import is_edit_model
from ipadapter_instruct.engine.preflight import check_config

KINDS = ("sd15", "sdxl", "edit")
RUNTIME_NAMES = ("torch", "onnx", "tensorrt")

# (kind, runtime) -> the class that runs it ("module:Class", imported on first use)
PIPELINES = {
    ("sd15", "torch"): "ipadapter_instruct.engine.pipeline:Pipeline",
    ("sdxl", "torch"): "ipadapter_instruct.engine.sdxl:SDXLPipeline",
    ("edit", "torch"): "ipadapter_instruct.engine.edit:EditPipeline",
    ("sd15", "onnx"): "ipadapter_instruct.export.onnx_runtime:OnnxPipeline",
    ("sdxl", "onnx"): "ipadapter_instruct.export.onnx_runtime:OnnxSDXLPipeline",
    ("edit", "onnx"): "ipadapter_instruct.export.onnx_runtime:OnnxEditPipeline",
    ("sd15", "tensorrt"): "ipadapter_instruct.engine.trt.runtime:TensorRTPipeline",
    ("sdxl", "tensorrt"): "ipadapter_instruct.engine.trt.runtime:TensorRTSDXLPipeline",
}


@dataclass(frozen=True)
class Capabilities:
    """What one loaded pipeline can do: data, read instead of probing attributes."""
    kind: str                 # sd15 | sdxl | edit
    runtime: str              # torch | onnx | tensorrt
    adapters: tuple = ()      # the loaded adapters' kinds, in load order (instruct | plus | plain)
    controlnets: int = 0      # ControlNets loaded (or exported with the UNet)
    per_row_adapter: bool = True   # adapter masks and step ranges (the PyTorch processors; graphs take one scale)
    step_batching: bool = True     # step-level batching (Pipeline.start/step/finish): the PyTorch backend
    size_conditioning: bool = False  # SDXL's original_size / target_size / crops_coords_top_left
    inpaint: bool = False     # an inpainting UNet (9 input channels): each request takes init_image and mask_image

    @property
    def instruct(self) -> bool:
        """Whether an adapter reads an instruction (IPAdapter-Instruct)."""
        return "instruct" in self.adapters


def pipeline_class(kind: str, runtime: str = "torch"):
    """The class that runs `kind` on `runtime` (EngineError naming what exists when the pair is not built)."""
    if kind not in KINDS:
        raise EngineError(f"unknown model kind {kind!r}; choose one of {', '.join(KINDS)}")
    if runtime not in RUNTIME_NAMES:
        raise EngineError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIME_NAMES)}")
    target = PIPELINES.get((kind, runtime))
    if target is None:
        built = ", ".join(r for k, r in PIPELINES if k == kind)
        raise EngineError(f"the {kind} model kind on {runtime} is not built yet; {kind} runs on {built}")
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class EngineConfig:
    """What loading a pipeline takes: the CLI commands, the server (engine.server.config.ServerConfig extends it),
    the demo and the bench all load through `load_pipeline(config)`. Field names are the CLI flags'."""
    model: str | None = None              # a diffusers folder (or hub id), or a single-file checkpoint
    model_config: str | None = None       # with a single file: a diffusers folder for its configs (default: shipped)
    image_encoder: str | None = None      # CLIPVisionModelWithProjection folder (with an adapter)
    adapter: str | tuple | None = None    # an adapter file, or several (acting together)
    device: str | None = None             # default: cuda when present
    dtype: str | None = None              # default: float16 on cuda, float32 on cpu
    attention_backend: str = "auto"
    backend: str = "pytorch"              # or tensorrt: the plans in `engines` (python -m export trt --out DIR)
    engines: str | None = None
    trt: str = "auto"                     # with tensorrt: which TensorRT loads the plans (auto: their builder)
    controlnet: tuple = ()                # ControlNet folders
    lora: tuple = ()                      # (file, scale) pairs, fused into the weights at load
    channels_last: bool = False           # the UNet and VAE in channels-last memory format
    compile: bool = False                 # torch.compile the UNet (each new batch shape compiles on first use)
    cuda_graphs: bool = False             # replay the UNet step from CUDA graphs, one capture per batch shape
    verify_fast_path: bool = True         # check each fused kernel, replay and compiled UNet at its first shape
    kind: str | None = None               # sd15 | sdxl | edit; None: what the model folder is

    @classmethod
    def from_args(cls, args, **overrides):
        """The fields of an argparse namespace whose names match (the CLI flags), lists as tuples."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**{**values, **overrides})


def model_kind(config: EngineConfig) -> str:
    """The kind a config asks for: its own, else edit for an InstructPix2Pix folder or file on the PyTorch backend,
    else sd15 (from_pretrained opens an SDXL folder as sdxl by itself)."""
    if config.kind is not None:
        return config.kind
    if config.model is not None and config.backend == "pytorch" and is_edit_model(config.model, config.model_config):
        return "edit"
    return "sd15"


def load_pipeline(config: EngineConfig):
    """The one way every entry point loads: the class of the config's kind, its weights, LoRAs fused, then
    channels-last, torch.compile and CUDA graphs as asked. -> a pipeline (engine.Pipeline or a subclass).
    What its configs and file headers show is checked first (engine/preflight.py), before the heavy imports."""
    check_config(config)
    adapter = config.adapter
    if isinstance(adapter, (list, tuple)):
        adapter = None if not adapter else adapter[0] if len(adapter) == 1 else list(adapter)
    cls = pipeline_class(model_kind(config), "torch")
    pipe = cls.from_pretrained(config.model, image_encoder=config.image_encoder, adapter=adapter, device=config.device,
                               dtype=config.dtype, attention_backend=config.attention_backend,
                               backend=config.backend, engines=config.engines, trt=config.trt,
                               verify_fast_path=config.verify_fast_path,
                               **({"config": config.model_config} if config.model_config else {}),
                               **({"controlnet": list(config.controlnet)} if config.controlnet else {}))
    for path, scale in config.lora:  # fused: nothing per step
        pipe.load_lora_weights(path, scale=scale)
    return apply_fast_path(pipe, config)


def apply_fast_path(pipe, config: EngineConfig):
    """The config's channels-last, torch.compile and CUDA graphs on a loaded pipeline (also one handed to the server
    ready-made). -> pipe."""
    import torch  # (deferred: this module stays light for `python -m engine --help`)

    if config.channels_last:
        for m in (pipe.unet, pipe.vae):
            m.to(memory_format=torch.channels_last)
    if config.compile:
        pipe.compile()
    if config.cuda_graphs:
        pipe.enable_cuda_graphs()  # EngineError off CUDA
    return pipe
