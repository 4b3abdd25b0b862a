"""Generation from an export folder: the five ONNX graphs under ONNX Runtime, with the engine's own request
handling, guidance and scheduler around them.

    from export.runtime import OnnxPipeline
    pipe = OnnxPipeline.from_export("out/onnx")
    images = pipe("a red house", image="cond.png", instruct="use the style of this image")

Everything between the graphs is the engine's (engine.Pipeline: requests, guidance branches and their
weights, the zero image for unconditional rows, latents, scheduler), so this is the loop a C++ or TensorRT
deployment reimplements around the same graphs, and a check that the graphs and the manifest carry everything
generation needs (tests/test_export_onnx.py: same latents as the engine). It runs on the CPU; it is a
reference, not the fast path. One adapter strength per request (a float), since unet.onnx takes one per row.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import torch

from engine.errors import EngineError
from engine.pipeline import Pipeline

from .onnx import GRAPHS, read_manifest, source_paths
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


class OnnxPipeline(Pipeline):
    """engine.Pipeline whose text encoder, image encoder, projector, UNet and VAE decoder are the exported graphs."""

    def __init__(self, folder: str, model: str | None = None, image_encoder: str | None = None):
        # (not Pipeline.__init__: its torch modules are the graphs here). model / image_encoder: where the tokenizer,
        # scheduler and image processor are, in place of the manifest's sources
        from diffusers import schedulers as dsched
        from transformers import CLIPTokenizer

        from engine.loading import load_image_encoder

        manifest = read_manifest(folder)
        missing = [g for g in GRAPHS if g not in manifest["graphs"]]
        if missing:
            raise EngineError(f"{folder} lacks {', '.join(missing)}: generation needs all five graphs")
        src = source_paths(manifest, folder, ("model", "image_encoder"),
                           dict(model=model, image_encoder=image_encoder))
        self.device, self.dtype = torch.device("cpu"), getattr(torch, manifest["dtype"])
        self.graphs = {g: _Graph(os.path.join(folder, e["file"]), e) for g, e in manifest["graphs"].items()}
        self.manifest = manifest
        self.tokenizer = CLIPTokenizer.from_pretrained(src["model"], subfolder="tokenizer")
        config = dsched.DDIMScheduler.load_config(src["model"], subfolder="scheduler")
        self.scheduler = getattr(dsched, config["_class_name"]).from_config(config)
        _, self.image_processor = load_image_encoder(src["image_encoder"], torch.float32)
        sample = manifest["graphs"]["unet"]["inputs"][0]["shape"]
        native = manifest["graphs"]["unet"]["axes"]["latent_height"]["opt"]
        self.unet = SimpleNamespace(config=SimpleNamespace(sample_size=native, in_channels=sample[1]))
        self.adapter = SimpleNamespace(kind=manifest["source"]["adapter_kind"], projector=self._project_graph)
        self.cross, self._static, self._fused_projector = {}, None, False
        self._progress, self.timings = {}, {}

    @classmethod
    def from_export(cls, folder: str, model: str | None = None, image_encoder: str | None = None) -> "OnnxPipeline":
        return cls(folder, model, image_encoder)

    @property
    def vae_scale_factor(self) -> int:
        return self.manifest["vae_scale_factor"]

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.graphs["text_encoder"](input_ids=ids)

    def encode_images(self, images, with_zero: bool = True) -> torch.Tensor:
        pixels = self.image_processor(images=images, return_tensors="pt").pixel_values
        if with_zero:
            pixels = torch.cat([pixels, torch.zeros_like(pixels[:1])])  # the last row: the all-zero image
        return self.graphs["image_encoder"](pixel_values=pixels)

    def _project_graph(self, image, instruct=None, prompt=None) -> torch.Tensor:
        return self.graphs["projector"](image_tokens=image, instruct_tokens=instruct, prompt_tokens=prompt)

    def _unet_inputs(self, text_rows, ip_rows, reqs, plan):
        bad = [r.scale for r in reqs if not isinstance(r.scale, (int, float)) or isinstance(r.scale, bool)]
        if bad:
            raise EngineError(f"unet.onnx takes one adapter strength per row; per-block scales such as {bad[0]!r} "
                              "are not exported")
        index = plan["branch_of_row"]
        scale = torch.tensor([float(reqs[r].scale) for r in plan["row_request"]], dtype=torch.float32)
        return text_rows.index_select(0, index), dict(ip=ip_rows.index_select(0, index), scale=scale)

    def _unet_step(self, x, t, text_rows, ctx) -> torch.Tensor:
        timestep = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        return self.graphs["unet"](sample=x, timestep=timestep, encoder_hidden_states=text_rows,
                                   ip_tokens=ctx["ip"], ip_scale=ctx["scale"])

    def _decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        return self.graphs["vae_decoder"](latent=latents).float()
