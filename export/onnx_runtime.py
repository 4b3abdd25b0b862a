"""Generation from an export folder: the five ONNX graphs under ONNX Runtime, with the engine's own request
handling, guidance and scheduler around them (engine.exported.ExportedPipeline).

    from ipadapter_instruct.export.onnx_runtime import OnnxPipeline
    pipe = OnnxPipeline.from_export("out/onnx")
    images = pipe("a red house", image="cond.png", instruct="use the style of this image")

It runs on the CPU; it is the reference, not the fast path, and a check that the graphs and the manifest carry
everything generation needs (tests/test_export_onnx.py: same latents as the engine). The TensorRT runtime
(engine.trt.runtime) is the same loop around the .plan files.

An export with ControlNets (`python -m export onnx --controlnet DIR`) takes the PyTorch pipeline's ControlNet
arguments, control_image= first among them:

    images = pipe("a red house", image="cond.png", control_image="edges.png", controlnet_conditioning_scale=0.8)

An SDXL export (manifest kind "sdxl") opens as OnnxSDXLPipeline, with SDXL's size conditioning:

    pipe = OnnxPipeline.from_export("out/onnx-sdxl")
    images = pipe("a red house", image="cond.png", instruct="use the style of this image", original_size=(1024, 1024))

Starting from a photo (engine/img2img.py: init_image=, strength=, and mask_image= to inpaint) takes the vae_encoder
graph: an inpainting model's export (9-channel UNet) always has it, a text-to-image one with `export onnx --img2img`:

    pipe = OnnxPipeline.from_export("out/onnx-inpaint")
    images = pipe("a red house", image="cond.png", instruct="use the style of this image", init_image="photo.png",
                  mask_image="mask.png", strength=0.9)

An InstructPix2Pix export (manifest kind "edit") runs as OnnxEditPipeline: engine.EditPipeline's requests,
three guidance branches and photo latents, with the photo encoded by the vae_encoder graph.

    pipe = OnnxEditPipeline.from_export("out/onnx-ip2p")
    images = pipe("make it winter", image="photo.png", adapter_image="style.png")
"""
from __future__ import annotations

import os

from types import SimpleNamespace

import numpy as np
import torch
from diffusers.configuration_utils import FrozenDict

from ipadapter_instruct.engine.edit import EditPipeline
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.exported import ExportedPipeline, ExportedSDXLPipeline, read_manifest

from ipadapter_instruct.export.ort_ops import session


class _Graph:
    """One ONNX Runtime session called with and returning torch tensors (a tuple for a graph of several outputs:
    a controlnet graph's residuals)."""

    def __init__(self, path: str, entry: dict):
        self.sess = session(path, plugin=entry.get("plugin_nodes", 0) > 0)
        self.inputs = [t["name"] for t in entry["inputs"]]
        self.dtypes = {t["name"]: t["dtype"] for t in entry["inputs"]}

    def __call__(self, **feeds):
        args = {n: feeds[n].detach().cpu().to(getattr(torch, self.dtypes[n])).numpy() for n in self.inputs}
        out = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in self.sess.run(None, args))
        return out if len(out) > 1 else out[0]


class OnnxPipeline(ExportedPipeline):
    """engine.Pipeline whose text encoder, image encoder, projector, UNet and VAE decoder are the ONNX graphs."""

    runtime = "onnxruntime"
    RUNTIME = "onnx"

    def __init__(self, folder: str, model: str | None = None, image_encoder: str | None = None):
        manifest = read_manifest(folder)
        kind = manifest.get("kind", "text_to_image")
        if (kind == "edit") != (self.KIND == "edit") or (kind == "sdxl") != (self.KIND == "sdxl"):
            right = {"edit": "OnnxEditPipeline", "sdxl": "OnnxSDXLPipeline"}.get(kind, "OnnxPipeline")
            what = {"edit": "an InstructPix2Pix", "sdxl": "an SDXL"}.get(kind, "a text-to-image")
            raise EngineError(f"{folder} is {what} export (manifest.json kind {kind!r}): run it with {right}, not "
                              f"{type(self).__name__}")
        graphs = {g: _Graph(os.path.join(folder, e["file"]), e) for g, e in manifest["graphs"].items()}
        super().__init__(folder, graphs, "cpu", model, image_encoder, manifest)

    @classmethod
    def from_export(cls, folder: str, model: str | None = None, image_encoder: str | None = None) -> "OnnxPipeline":
        """The export in `folder`; an SDXL export (manifest kind "sdxl") opens as OnnxSDXLPipeline."""
        if cls is OnnxPipeline and read_manifest(folder).get("kind") == "sdxl":
            cls = OnnxSDXLPipeline
        return cls(folder, model, image_encoder)


class OnnxSDXLPipeline(ExportedSDXLPipeline, OnnxPipeline):
    """engine.sdxl.SDXLPipeline's maths around the six ONNX graphs of an SDXL export (text_encoder_2 beside the
    five), with its size conditioning: original_size, target_size and crops_coords_top_left per call."""


class _GraphVae:
    """The VAE as EditPipeline reads it: a config, and encode(pixels).latent_dist (its mode: the photo latent) from
    the vae_encoder graph (ExportedPipeline.photo_distribution)."""

    def __init__(self, config, distribution):
        self.config, self.distribution = config, distribution

    def encode(self, pixels):
        # pixels: (B, 3, H, W) in [-1, 1] -> latent_dist over (B, 4, H/f, W/f), unscaled
        return SimpleNamespace(latent_dist=self.distribution(pixels))


class OnnxEditPipeline(EditPipeline, OnnxPipeline):
    """engine.EditPipeline (InstructPix2Pix) around the six ONNX graphs of an edit export: the 8-channel UNet and
    vae_encoder for the photo latents."""

    def __init__(self, folder: str, model: str | None = None, image_encoder: str | None = None):
        super().__init__(folder, model, image_encoder)  # OnnxPipeline's (EditPipeline has none)
        if "vae_encoder" not in self.graphs:
            raise EngineError(f"{folder} lacks vae_encoder: editing encodes the photo with it")
        latent = self.manifest["graphs"]["vae_decoder"]["inputs"][0]["shape"][1]
        self.vae = _GraphVae(FrozenDict({**self.vae.config, "latent_channels": latent}), self.photo_distribution)
