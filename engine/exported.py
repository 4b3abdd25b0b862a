"""Generation from exported graphs: the engine's own request handling, guidance and scheduler around five
graphs (text_encoder, image_encoder, projector, unet, vae_decoder) that some runtime executes, and a controlnet
graph per ControlNet when the export has them (`python -m export onnx --controlnet DIR`).

Everything between the graphs is engine.Pipeline's (requests, guidance branches and their weights, the zero
image for unconditional rows, latents, scheduler), so this is the loop a C++ or TensorRT deployment reimplements
around the same graphs. Two runtimes use it: ONNX Runtime (export.onnx_runtime.OnnxPipeline, the CPU reference) and
TensorRT (engine.trt.runtime.TensorRTPipeline, the .plan files of `python -m export trt`). One adapter strength
per request (a float), since the UNet graph takes one per row.

ControlNet: engine/controlnet.py's control images, scales, guidance window and guess mode, unchanged; its
`residuals` calls each net as diffusers' ControlNetModel is called, and GraphControlNet answers that call from the
net's graph. The UNet graph of such an export takes the residuals as inputs (manifest: unet's
"controlnet_residuals"); a step without them (outside the guidance window, every scale 0) feeds zeros.

img2img and inpainting (`init_image=`, `mask_image=`, `strength=`): engine/img2img.py's, unchanged, with the photo
encoded by the vae_encoder graph (its mean and log-variance: `photo_distribution` samples it as diffusers' VAE does,
with the request's generator). An inpainting export's UNet takes 9 channels (latents, mask, masked-photo latent) and
always has vae_encoder; a text-to-image one has it where exported with --img2img, else a photo is refused in one line.

SDXL (manifest kind "sdxl"): ExportedSDXLPipeline puts engine/sdxl.py's maths around the six graphs of an SDXL
export (text_encoder_2 beside the five); each runtime's loader picks it from the manifest.

The folder format is the export's manifest.json (format FORMAT), read here so that the engine can run an export
without importing the exporter.
"""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import torch

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.graph_names import FORMAT, GRAPHS, SDXL_GRAPHS, SOURCES  # noqa: F401 (this module's API)
from ipadapter_instruct.engine.img2img import photo_size
from ipadapter_instruct.engine.loading import _crop
from ipadapter_instruct.engine.pipeline import Pipeline
from ipadapter_instruct.engine.prepared import LastTimings
from ipadapter_instruct.engine.sdxl import SDXLPipeline
from ipadapter_instruct.engine.selfcheck import SelfCheck


def resolve_shape(shape, sizes: dict[str, int]) -> tuple[int, ...]:
    """A manifest shape at the given axis sizes: ints as they are, axis names, and "axis/d" (a ControlNet
    residual's side: the axis over d, rounded up as the UNet's stride-2 convolutions round)."""
    out = []
    for a in shape:
        if isinstance(a, str):
            name, _, d = a.partition("/")
            out.append(-(-sizes[name] // int(d or 1)))
        else:
            out.append(a)
    return tuple(out)


def read_manifest(onnx_dir: str) -> dict:
    """manifest.json of an export folder, checked for its format and the keys every reader needs."""
    path = os.path.join(onnx_dir, "manifest.json")
    if not os.path.isdir(onnx_dir):
        raise EngineError(f"export folder not found: {onnx_dir}")
    if not os.path.isfile(path):
        raise EngineError(f"{onnx_dir} has no manifest.json; give the folder `python -m export onnx` wrote")
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise EngineError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise EngineError(f"{path} is not an export manifest (format {FORMAT!r} expected)")
    if not isinstance(m.get("graphs"), dict) or not m["graphs"]:
        raise EngineError(f"{path} lists no graphs")
    for name, g in m["graphs"].items():
        missing = [key for key in ("file", "inputs", "profiles") if key not in g]
        if missing:
            raise EngineError(f"{path}: graph {name} has no {', '.join(missing)}")
    return m


def source_paths(manifest: dict, onnx_dir: str, names=tuple(SOURCES), overrides=None) -> dict[str, str]:
    """The weights an export was made from: `overrides` (name -> path, None: not given) first, then the manifest's
    paths, relative ones from `onnx_dir` (absolute in manifests written before paths were stored relative)."""
    src = manifest.get("source") or {}
    found = {}
    for name in names:
        if (overrides or {}).get(name) is not None:
            found[name] = overrides[name]  # checked where it loads, like any path given to the engine
            continue
        path = src.get(name)
        if path is None:
            raise EngineError(f"{onnx_dir}/manifest.json names no {name}: pass {SOURCES[name]} PATH")
        if name in src.get("relative", ()):
            path = os.path.normpath(os.path.join(onnx_dir, path))
        elif not os.path.isabs(path):  # a hub id, as given to the export
            found[name] = path
            continue
        if not os.path.exists(path):
            raise EngineError(f"the {name.replace('_', ' ')} this export was made from is not at {path} (moved or "
                              f"deleted): pass {SOURCES[name]} PATH with where it is now")
        found[name] = path
    return found


class GraphControlNet:
    """A controlnet graph called as engine.controlnet.residuals calls diffusers' ControlNetModel: the graph gives the
    residuals times the per-row conditioning_scale; guess mode's block scales (0.1 to 1, as diffusers) are applied
    here, from the manifest. -> (down residuals, mid residual)."""

    def __init__(self, graph, entry: dict):
        self.graph, self.guess = graph, entry["guess_mode_scales"]

    def __call__(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                 guess_mode=False, return_dict=False):
        # sample: (rows, C, h, w); controlnet_cond: (rows, 3, f*h, f*w) in [0, 1]
        rows = sample.shape[0]
        t = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).reshape(-1).expand(rows)
        out = self.graph(sample=sample, timestep=t, encoder_hidden_states=encoder_hidden_states,
                         controlnet_cond=controlnet_cond,
                         conditioning_scale=torch.full((rows,), float(conditioning_scale), device=sample.device))
        if guess_mode:  # diffusers multiplies by its float32 logspace, one 0-d tensor per residual
            out = [r * torch.tensor(s, device=r.device) for r, s in zip(out, self.guess)]
        return list(out[:-1]), out[-1]


class ExportedPipeline(Pipeline):
    """engine.Pipeline whose text encoder, image encoder, projector, UNet and VAE decoder are exported graphs.

    graphs: {name: callable(**inputs) -> torch.Tensor}, one per GRAPHS entry (and one per manifest "controlnets"
    entry, returning a tuple: its outputs), taking and returning tensors on `device`; model / image_encoder: where
    the tokenizer, scheduler and image processor are, in place of the manifest's sources."""

    def __init__(self, folder: str, graphs: dict, device="cpu", model: str | None = None,
                 image_encoder: str | None = None, manifest: dict | None = None):
        # (not Pipeline.__init__: its torch modules are the graphs here)
        from diffusers import schedulers as dsched
        from diffusers.configuration_utils import FrozenDict
        from transformers import CLIPTokenizer

        from ipadapter_instruct.engine.loading import load_image_encoder

        manifest = manifest or read_manifest(folder)
        sdxl = manifest.get("kind") == "sdxl"
        if sdxl != (self.KIND == "sdxl"):
            raise EngineError(f"{folder} is {'an SDXL' if sdxl else 'an SD1.5'} export (manifest.json kind "
                              f"{manifest.get('kind', 'text_to_image')!r}): {type(self).__name__} runs "
                              f"{'SD1.5' if sdxl else 'SDXL'} ones; open it with from_export / from_engines")
        needed = SDXL_GRAPHS if sdxl else GRAPHS
        missing = [g for g in needed if g not in graphs]
        if missing:
            raise EngineError(f"{folder} lacks {', '.join(missing)}: generation needs all {len(needed)} graphs "
                              f"({', '.join(needed)})")
        src = source_paths(manifest, folder, ("model", "image_encoder"),
                           dict(model=model, image_encoder=image_encoder))
        self.sources = src
        self.device, self.dtype = torch.device(device), getattr(torch, manifest["dtype"])
        self.graphs, self.manifest, self.manifest_folder = graphs, manifest, folder
        self.tokenizer = CLIPTokenizer.from_pretrained(src["model"], subfolder="tokenizer")
        config = dsched.DDIMScheduler.load_config(src["model"], subfolder="scheduler")
        self.scheduler = getattr(dsched, config["_class_name"]).from_config(config)
        _, self.image_processor = load_image_encoder(src["image_encoder"], torch.float32)
        sample = manifest["graphs"]["unet"]["inputs"][0]["shape"]
        native = manifest["graphs"]["unet"]["axes"]["latent_height"]["opt"]
        levels = (manifest["vae_scale_factor"]).bit_length()  # 2^(levels - 1) = the VAE factor, as diffusers counts
        # what callers read of the modules' configs (the server: native size and VAE factor), as diffusers' FrozenDicts
        self.unet = SimpleNamespace(config=FrozenDict(sample_size=native, in_channels=sample[1]))
        decoder = manifest["graphs"].get("vae_decoder", {}).get("inputs") or [{"shape": sample}]
        latent_channels = decoder[0]["shape"][1]  # (the UNet's sample may hold more: InstructPix2Pix's photo latent)
        self.vae = SimpleNamespace(config=FrozenDict(block_out_channels=[0] * levels, latent_channels=latent_channels,
                                                     scaling_factor=manifest["vae_scaling_factor"]))
        if sample[1] == 2 * latent_channels + 1 and "vae_encoder" not in graphs:
            raise EngineError(f"{folder} is an inpainting model ({sample[1]} UNet input channels) but lacks "
                              "vae_encoder, which encodes its photos: export it again")
        self.attention_backend = f"{self.runtime} ({manifest.get('attention', 'plugin')} attention)"
        self.adapter = SimpleNamespace(kind=manifest["source"]["adapter_kind"], projector=self._project_graph)
        self.cross, self._static, self._fused_projector, self._compiled = {}, None, False, False
        self.selfcheck = SelfCheck(enabled=False)  # the graphs' kernels are the runtime's: nothing to check here
        nets = manifest.get("controlnets") or []
        lacking = [c["graph"] for c in nets if c["graph"] not in graphs]
        if lacking:
            raise EngineError(f"{folder} lacks {', '.join(lacking)}: its UNet takes ControlNet residuals "
                              "(manifest.json controlnets); export them with --controlnet")
        self.controlnets = [GraphControlNet(graphs[c["graph"]], c) for c in nets]
        unet = manifest["graphs"]["unet"]
        shapes = {t["name"]: t["shape"] for t in unet["inputs"]}
        self._residuals = [(n, shapes[n]) for n in unet.get("controlnet_residuals", ())]
        self._zeros = {}  # shape -> zeros: the residuals of a step without ControlNet
        self._progress, self._last, self.encoder_cache = {}, LastTimings(), None

    runtime = "exported graphs"  # what runs them, for logs and the server's /v1/models
    RUNTIME = "graphs"  # (engine/registry.py) onnx or tensorrt in the runtimes built on this class

    @property
    def vae_scale_factor(self) -> int:
        return self.manifest["vae_scale_factor"]

    def _size(self, reqs, height, width, max_size) -> tuple[int, int]:
        m, f = self.manifest["graphs"]["unet"].get("latent_multiple"), self.vae_scale_factor  # (older exports: none)
        if m:  # img2img's default size, the photo's, rounded down to the graph's grid rather than the VAE's
            height, width = photo_size(reqs, height, width, m * f)
        height, width = super()._size(reqs, height, width, max_size)
        if m and ((height // f) % m or (width // f) % m):
            raise EngineError(f"the exported UNet takes heights and widths that are multiples of {m * f} px (its "
                              f"latent halves {m.bit_length() - 1} times); got {height}x{width}")
        return height, width

    def enable_cuda_graphs(self, enabled: bool = True) -> None:
        raise EngineError(f"{type(self).__name__} runs exported graphs; CUDA graphs are the PyTorch backend's")

    def fast_path_report(self) -> dict:
        return self.selfcheck.report({"graphs": self.runtime})  # (no PyTorch fast path here to check)

    def load_lora_weights(self, *args, **kwargs):
        raise EngineError(f"{type(self).__name__} runs exported graphs, which take no LoRA (LoRAs are not part of "
                          "the export yet)")

    def compile(self, **kwargs) -> None:
        raise EngineError(f"{type(self).__name__} runs exported graphs; torch.compile is the PyTorch backend's")

    def set_attention_backend(self, backend: str) -> None:
        raise EngineError(f"{type(self).__name__} runs exported graphs, whose attention is fixed at export time")

    def parse(self, args: dict) -> list:
        reqs = super().parse(args)
        if "vae_encoder" not in self.graphs and any(getattr(r, "start", None) is not None for r in reqs):
            folder = self.manifest_folder
            fix = (f"build its plan: `python -m export trt ONNX_DIR --out {folder} --graphs vae_encoder`"
                   if "vae_encoder" in self.manifest["graphs"] else "export the model again with --img2img")
            raise EngineError(f"{folder} has no vae_encoder graph: init_image= is encoded by it; {fix}")
        return reqs

    def photo_distribution(self, pixels: torch.Tensor):
        """pixels (B, 3, H, W) in [-1, 1] -> diffusers' DiagonalGaussianDistribution from the vae_encoder graph's
        mean and log-variance (an export from before the log-variance: its mean, a point mass)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        out = self.graphs["vae_encoder"](pixels=pixels)
        if isinstance(out, torch.Tensor):
            return DiagonalGaussianDistribution(torch.cat([out, out], dim=1), deterministic=True)
        return DiagonalGaussianDistribution(torch.cat(list(out), dim=1))

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.graphs["text_encoder"](input_ids=ids.to(self.device))

    def _image_rows(self, pixels: torch.Tensor, pooled: bool) -> torch.Tensor:
        # (pooled: the graph gives what its one adapter reads)
        return self.graphs["image_encoder"](pixel_values=pixels.to(self.device))

    def _zero_image_row(self, pooled: bool) -> torch.Tensor:
        # the graph's own encoding of the all-zero pixels, whatever its adapter reads
        return self._image_rows(torch.zeros(1, 3, *_crop(self.image_processor)), pooled)

    def _project_graph(self, image, instruct=None, prompt=None) -> torch.Tensor:
        return self.graphs["projector"](image_tokens=image, instruct_tokens=instruct, prompt_tokens=prompt)

    def _unet_inputs(self, text_rows, ip_rows, reqs, plan, call):
        bad = [r.scale for r in reqs if not isinstance(r.scale, (int, float)) or isinstance(r.scale, bool)]
        if bad:
            raise EngineError(f"the exported UNet takes one adapter strength per row; per-block scales such as "
                              f"{bad[0]!r} are not exported")
        index = plan["branch_of_row"].to(text_rows.device)
        scale = torch.tensor([float(reqs[r].scale) for r in plan["row_request"]], dtype=torch.float32,
                             device=self.device)
        return text_rows.index_select(0, index), dict(ip=ip_rows.index_select(0, index.to(ip_rows.device)),
                                                      scale=scale)

    def unet_step(self, x, t, text_rows, ctx, control=None, added=None) -> torch.Tensor:
        timestep = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        return self.graphs["unet"](sample=x, timestep=timestep, encoder_hidden_states=text_rows,
                                   ip_tokens=ctx["ip"], ip_scale=ctx["scale"], **self._residual_feeds(x, control),
                                   **(added or {}))  # an SDXL UNet's text_embeds and time_ids per row

    def _residual_feeds(self, x, control) -> dict:
        """The UNet graph's ControlNet inputs: this step's (down, mid) residuals, or zeros (no ControlNet)."""
        if not self._residuals:
            return {}
        if control is not None:
            return dict(zip((n for n, _ in self._residuals), (*control[0], control[1])))
        sizes = {"batch": x.shape[0], "latent_height": x.shape[2], "latent_width": x.shape[3]}
        feeds = {}
        for name, shape in self._residuals:
            shape = resolve_shape(shape, sizes)
            if shape not in self._zeros:
                self._zeros[shape] = torch.zeros(shape, dtype=x.dtype, device=x.device)
            feeds[name] = self._zeros[shape]
        return feeds

    def _decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        return self.graphs["vae_decoder"](latent=latents).float()


class ExportedSDXLPipeline(SDXLPipeline, ExportedPipeline):
    """engine.sdxl.SDXLPipeline's maths (two-encoder tokens, pooled embeddings and time ids per row, the Instruct
    projector's CLIP-L text) around the six graphs of an SDXL export: text_encoder gives the last and penultimate
    hidden states, text_encoder_2 the penultimate state and the pooled projection, and the UNet takes text_embeds
    and time_ids per row (manifest.json "sdxl" says how they are assembled)."""

    def __init__(self, *args, **kwargs):
        super(SDXLPipeline, self).__init__(*args, **kwargs)  # the exported pipeline's, not SDXLPipeline's modules
        from transformers import CLIPTokenizer

        self.tokenizer_2 = CLIPTokenizer.from_pretrained(self.sources["model"], subfolder="tokenizer_2")

    photo_distribution = ExportedPipeline.photo_distribution  # the graph's, whatever SDXLPipeline encodes with

    def _ids(self, tokenizer, texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    def _text_entries(self, texts: list[str]) -> list[tuple]:
        _, first = self.graphs["text_encoder"](input_ids=self._ids(self.tokenizer, texts))
        second, pooled = self.graphs["text_encoder_2"](input_ids=self._ids(self.tokenizer_2, texts))
        return list(zip(torch.cat([first, second], dim=-1).to(self.device, self.dtype),
                        pooled.to(self.device, self.dtype)))

    def projector_text(self, texts: list[str]) -> torch.Tensor:
        return self.graphs["text_encoder"](input_ids=self._ids(self.tokenizer, texts))[0].to(self.device, self.dtype)
