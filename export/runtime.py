"""Generation from an export folder: the five ONNX graphs under ONNX Runtime, with the engine's own request
handling, guidance and scheduler around them (engine.exported.ExportedPipeline).

    from export.runtime import OnnxPipeline
    pipe = OnnxPipeline.from_export("out/onnx")
    images = pipe("a red house", image="cond.png", instruct="use the style of this image")

It runs on the CPU; it is the reference, not the fast path, and a check that the graphs and the manifest carry
everything generation needs (tests/test_export_onnx.py: same latents as the engine). The TensorRT runtime
(engine.trt.runtime) is the same loop around the .plan files.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from engine.exported import ExportedPipeline, read_manifest

from .ort_ops import session


class _Graph:
    """One ONNX Runtime session called with and returning torch tensors."""

    def __init__(self, path: str, entry: dict):
        self.sess = session(path, plugin=entry.get("plugin_nodes", 0) > 0)
        self.inputs = [t["name"] for t in entry["inputs"]]
        self.dtypes = {t["name"]: t["dtype"] for t in entry["inputs"]}

    def __call__(self, **feeds) -> torch.Tensor:
        args = {n: feeds[n].detach().cpu().to(getattr(torch, self.dtypes[n])).numpy() for n in self.inputs}
        return torch.from_numpy(np.ascontiguousarray(self.sess.run(None, args)[0]))


class OnnxPipeline(ExportedPipeline):
    """engine.Pipeline whose text encoder, image encoder, projector, UNet and VAE decoder are the ONNX graphs."""

    runtime = "onnxruntime"

    def __init__(self, folder: str, model: str | None = None, image_encoder: str | None = None):
        manifest = read_manifest(folder)
        graphs = {g: _Graph(os.path.join(folder, e["file"]), e) for g, e in manifest["graphs"].items()}
        super().__init__(folder, graphs, "cpu", model, image_encoder, manifest)

    @classmethod
    def from_export(cls, folder: str, model: str | None = None, image_encoder: str | None = None) -> "OnnxPipeline":
        return cls(folder, model, image_encoder)
