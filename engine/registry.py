"""Model kinds and runtimes: one table from (kind, runtime) to the class that runs it, and what each can do.

A kind is the model's maths (sd15: text-to-image on an SD1.5-layout UNet, sdxl, edit: InstructPix2Pix); a runtime is
what executes its graphs (torch, onnx: ONNX Runtime, tensorrt). `pipe.kind`, `pipe.runtime_name` and
`pipe.capabilities` answer what callers used to probe with getattr. Nothing heavy is imported here: the table holds
"module:Class" names, imported when a pipeline of that kind is opened.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from .errors import EngineError

KINDS = ("sd15", "sdxl", "edit")
RUNTIME_NAMES = ("torch", "onnx", "tensorrt")

# (kind, runtime) -> the class that runs it ("module:Class", imported on first use)
PIPELINES = {
    ("sd15", "torch"): "engine.pipeline:Pipeline",
    ("sdxl", "torch"): "engine.sdxl:SDXLPipeline",
    ("edit", "torch"): "engine.edit:EditPipeline",
    ("sd15", "onnx"): "export.runtime:OnnxPipeline",
    ("sdxl", "onnx"): "export.runtime:OnnxSDXLPipeline",
    ("edit", "onnx"): "export.runtime:OnnxEditPipeline",
    ("sd15", "tensorrt"): "engine.trt.runtime:TensorRTPipeline",
    ("sdxl", "tensorrt"): "engine.trt.runtime:TensorRTSDXLPipeline",
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
        raise EngineError(f"a {kind} model on {runtime} is not built yet; {kind} runs on {built}")
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
