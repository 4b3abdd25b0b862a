"""`engine.Pipeline`: IPAdapter-Instruct (or IP-Adapter+) generation on a Stable Diffusion 1.5 UNet.

One call may hold several requests (different prompts, images, instructions, scales, guidance modes):
all their guidance branches and images run as one UNet batch per step, and each image's noise prediction is
combined from its own branch rows only (guidance.Combination), so no request's numbers reach another's image;
a request whose latents go non-finite fails alone (guidance.NonFinite). Everything that does not
change across steps is computed once per call: text, instruction and image encodings, projector outputs,
and the K/V of the encoder tokens in every cross-attention layer.
"""
from __future__ import annotations

import inspect
import logging
import os
import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from kernels import BACKENDS, choose

from . import DEFAULT_NEGATIVE, DEFAULT_PROMPT, DTYPE_NAMES, RUNTIMES, bounds, fastpath
from .adapter import Adapter, load_adapter
from .attention import (AdapterContext, choose_impls, expand_scale, install_processors, precompute_kv,
                        query_lengths)
from .errors import EngineError
from .graphs import StaticUNet
from .combine import Combination, NonFinite, finite_images
from .controlnet import control_numbers, control_state, load_controlnets, residuals
from .guidance import branch_weights, resolve_mode
from .loading import check_size, load_base, load_image, load_image_encoder, make_scheduler, resolve
from .lora import LoraMixin
from .prepared import CallState, LastTimings, Prepared, select_rows
from .registry import Capabilities, pipeline_class
from .requests import Request, parse_requests
from .selfcheck import SelfCheck, describe, module_fp32, shape_key
from .trt import check_choice

log = logging.getLogger(__name__)

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
# what replays or compiles the UNet step, by (CUDA graphs, compiled): a component of the first-use checks
STEP_COMPONENTS = {(True, False): "cuda_graph", (False, True): "compiled_unet", (True, True): "compiled_unet+cuda_graph"}


def as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise EngineError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_channels(unet_channels: int, latent_channels: int, edit: bool) -> None:
    """A text-to-image UNet takes the latents alone; an InstructPix2Pix one the latents and the image latent."""
    if edit and unet_channels == latent_channels:
        raise EngineError(f"this is a text-to-image model ({unet_channels} UNet input channels); editing needs an "
                          f"InstructPix2Pix model ({2 * latent_channels} channels): generate with Pipeline / "
                          "`python -m engine generate`")
    if not edit and unet_channels == 2 * latent_channels:
        raise EngineError(f"this is an InstructPix2Pix model ({unet_channels} UNet input channels: latents + image "
                          "latent): edit with EditPipeline / `python -m engine edit`")
    if unet_channels != latent_channels * (2 if edit else 1):
        raise EngineError(f"the UNet takes {unet_channels} input channels and the VAE makes {latent_channels}: "
                          "not a Stable Diffusion text-to-image or InstructPix2Pix model")


def expand_rows(branches: list[dict], texts: set, reqs: list) -> dict:
    """The plan from branch rows ({"r": request, "w": weight, "text": ...}): UNet rows (branches x each request's
    images), which latent each row predicts for, and how each latent's own rows combine (guidance.Combination)."""
    offsets = [0]
    for req in reqs:
        offsets.append(offsets[-1] + req.num_images)
    branch_of_row, latent_of_row, cols = [], [], []
    for j, row in enumerate(branches):
        for k in range(reqs[row["r"]].num_images):
            branch_of_row.append(j)
            latent_of_row.append(offsets[row["r"]] + k)
            cols.append(row["w"])
    return {"branches": branches, "texts": texts, "text": [b["text"] for b in branches],
            "branch_of_row": torch.tensor(branch_of_row), "latent_of_row": torch.tensor(latent_of_row),
            "row_request": [branches[j]["r"] for j in branch_of_row],
            "combine": Combination.of(latent_of_row, cols, offsets[-1])}


class Pipeline(LoraMixin):
    KIND = "sd15"     # the model's maths (engine/registry.py): sd15 | sdxl | edit
    RUNTIME = "torch"  # what runs its graphs: torch | onnx | tensorrt
    EDIT = False  # EditPipeline (engine/edit.py): an InstructPix2Pix UNet

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, image_encoder=None, image_processor=None,
                 adapter: Adapter | list | None = None, device="cpu", dtype=torch.float32, attention_backend="auto",
                 controlnets=None, verify_fast_path: bool = True):
        check_channels(unet.config.in_channels, vae.config.latent_channels, self.EDIT)
        self.device, self.dtype = torch.device(device), dtype
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer, self.scheduler = tokenizer, scheduler
        # several adapters act together (diffusers' load_ip_adapter with lists); `adapter` is the first
        self._adapters = list(adapter) if isinstance(adapter, (list, tuple)) else ([adapter] if adapter else [])
        self.adapter = self._adapters[0] if self._adapters else None
        self.image_encoder, self.image_processor = image_encoder, image_processor
        extra = [m for a in self.adapters for m in (a.projector, a.layers)]
        self.controlnets = list(controlnets or [])  # engine/controlnet.py
        for m in (unet, vae, text_encoder, image_encoder, *extra, *self.controlnets):
            if m is not None:
                if next(m.parameters()).dtype != dtype:
                    m.to(dtype=dtype)
                m.to(self.device).eval().requires_grad_(False)
        self.cross = install_processors(unet, [a.layers for a in self.adapters])
        self._static = None  # engine.graphs.StaticUNet once enable_cuda_graphs() is called
        self._compiled = False
        # first-use checks of the fused kernels, graphs and compiled UNet (engine/selfcheck.py)
        self.selfcheck = SelfCheck(verify_fast_path)
        self.set_attention_backend(attention_backend)
        self._progress = {}
        self._last = LastTimings()
        self.encoder_cache = None  # set_encoder_cache: the server's conditioning cache

    @classmethod
    def from_pretrained(cls, model, image_encoder=None, adapter=None, device=None, dtype=None,
                        attention_backend="auto", backend="pytorch", engines=None, controlnet=None,
                        config=None, trt="auto", verify_fast_path: bool = True) -> "Pipeline":
        """model: a diffusers SD folder (or hub id), or a single-file checkpoint (an original-layout
        `.safetensors`/`.ckpt`, read by diffusers' from_single_file) whose configs come from `config` (a local
        diffusers folder; default: the SD1.5 / InstructPix2Pix ones shipped with the package).
        image_encoder: a CLIPVisionModelWithProjection folder; adapter: a two-key `.bin`/`.safetensors` file, or a
        list of them (several adapters at once). device defaults to cuda when present, dtype to float16 on cuda and
        float32 on the CPU. attention_backend: auto | triton | sdpa | reference (`kernels.BACKENDS`) for the
        cross-attention. backend: pytorch, or tensorrt with engines= the folder of `python -m export trt`
        (engine.trt.runtime.TensorRTPipeline: the adapter and dtype are the engines'; model and image_encoder, when
        given, say where the tokenizer, scheduler and image processor are now); trt: with backend tensorrt, which
        TensorRT loads the plans (auto: the one engines.json names, which full / rtx must match). verify_fast_path:
        check each fused kernel, CUDA-graph replay and compiled UNet against its eager path at its first use of a
        shape, falling back where it fails (engine/selfcheck.py; `fast_path_report()` says what runs)."""
        if backend not in RUNTIMES:
            raise EngineError(f"unknown backend {backend!r}; choose one of {', '.join(RUNTIMES)}")
        if check_choice(trt) != "auto" and backend != "tensorrt":
            raise EngineError(f"trt={trt!r} chooses the TensorRT of backend='tensorrt' (--backend tensorrt); the "
                              f"{backend} backend runs without one: drop it")
        several = isinstance(adapter, (list, tuple))
        if several and len(adapter) == 1:
            adapter, several = adapter[0], False
        if backend == "tensorrt":
            if config is not None:
                raise EngineError("config= is for a single-file model on the PyTorch backend; the TensorRT engines "
                                  "carry their own")
            if several:
                raise EngineError("the TensorRT engines hold one adapter: several adapters run on the PyTorch backend")
            if controlnet is not None:
                raise EngineError("the TensorRT engines carry their ControlNets (exported with `python -m export onnx "
                                  "--controlnet DIR`): drop controlnet=")
            return pipeline_class("sd15", "tensorrt").open_engines(model, image_encoder, adapter, device, dtype,
                                                                   engines, trt)
        if engines is not None:
            raise EngineError("engines= is for backend='tensorrt'")
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
        parts = load_base(model, dtype, config=config)
        if "text_encoder_2" in parts:  # an SDXL folder: engine/sdxl.py
            if cls.KIND != "sdxl" and cls is not Pipeline:
                raise EngineError(f"{os.fspath(model)} is an SDXL model; {cls.__name__} runs SD1.5-layout models")
            cls = pipeline_class("sdxl")
        elif cls.KIND == "sdxl":
            raise EngineError(f"{os.fspath(model)} is not an SDXL folder (no text_encoder_2/ and tokenizer_2/)")
        encoder = processor = None
        loaded = []
        if files:
            encoder, processor = load_image_encoder(image_encoder, dtype)
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
        nets = None
        if controlnet is not None:
            nets = load_controlnets(controlnet, parts["unet"], dtype)
        return cls(**parts, image_encoder=encoder, image_processor=processor,
                   adapter=(loaded if several else loaded[0]) if loaded else None, device=device, dtype=dtype,
                   attention_backend=attention_backend, controlnets=nets, verify_fast_path=verify_fast_path)

    def enable_cuda_graphs(self, enabled: bool = True) -> None:
        """Replay the UNet step from CUDA graphs, captured once per shape (rows, size) on first use; a new
        request copies its K/V, scales, text rows and latents into the graph's static buffers and never
        re-captures. CUDA only. Capture has not run on this project's machines yet (no GPU lent); the
        static-buffer path it replays is tested eagerly on the CPU."""
        if enabled and self.device.type != "cuda":
            raise EngineError(f"CUDA graphs need a pipeline on cuda; this one is on {self.device}")
        self._static = StaticUNet(self.unet, capture=True) if enabled else None
        self._graphs_changed()

    def compile(self, **kwargs) -> None:
        """torch.compile the UNet in place (its module names, which the adapter's K/V precompute uses, stay).
        kwargs go to torch.compile (mode, backend, fullgraph, dynamic). The first call at each new shape pays
        the compile time. With the sdpa backend the whole UNet, adapter processors included, is one graph
        (tested with fullgraph=True); the Triton kernels are launched outside the graph."""
        self.unet.compile(**kwargs)
        self._compiled = True
        self._graphs_changed()  # graphs captured before hold the uncompiled kernels

    def set_attention_backend(self, backend: str) -> None:
        """Run every cross-attention with `backend` (auto | triton | sdpa | reference); fallbacks are logged.
        Where that is triton, the projector, GroupNorm+SiLU and GEGLU run on their fused kernels too."""
        if backend not in BACKENDS:
            raise EngineError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        choose_impls(self.unet, self.cross, self.device, self.dtype, backend, self.selfcheck)
        self.attention_backend = backend
        self._graphs_changed()  # graphs captured before hold the previous backend's kernels
        # the other fused kernels follow the same choice: the projector's blocks (head size 64 in every
        # released checkpoint), GroupNorm+SiLU in the UNet's, VAE's and ControlNets' resnets, GEGLU
        fused = choose(self.device, self.dtype, 64, backend) == "triton"
        # every adapter's projector but a plain one's (a Linear + LayerNorm)
        self._fused_projector = fused and any(a.kind != "plain" for a in self.adapters)
        for m in (self.unet, self.vae, *getattr(self, "controlnets", ())):
            if fused:
                fastpath.fuse(m, self.selfcheck)
            else:
                fastpath.unfuse(m)

    def _graphs_changed(self) -> None:
        """Graphs captured or compiled before are stale (other kernels or weights): drop them and their verdicts."""
        if self._static is not None:
            self._static.entries.clear()
        self.selfcheck.forget(*STEP_COMPONENTS.values())

    def fast_path_report(self) -> dict:
        """What runs fused and what fell back to its eager path, and why: the first-use checks' verdicts
        (engine/selfcheck.py) with each check's cost. {"verify", "fused", "checked", "fell_back", "unverified",
        "check_ms", "checks"}."""
        fused = {"decoupled_attention": sorted({p.backend for p in self.cross.values()}) or ["none"],
                 "group_norm_silu": "triton" if fastpath.fused(self.unet) else "pytorch",
                 "projector": "triton" if self._fused_projector else "pytorch",
                 "unet_step": self._step_component() or "eager"}
        fused["geglu"] = fused["group_norm_silu"]
        return self.selfcheck.report(fused)

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether UNet steps replay CUDA graphs (step-level batching then pads rows to a bucket)."""
        return self._static is not None

    def _step_component(self) -> str | None:
        return STEP_COMPONENTS.get((self._static is not None, self._compiled))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def kind(self) -> str:
        return self.KIND

    @property
    def capabilities(self) -> Capabilities:
        """What this pipeline can do (engine/registry.py), read in place of attribute probes."""
        torch_run = self.RUNTIME == "torch"
        return Capabilities(kind=self.KIND, runtime=self.RUNTIME, adapters=tuple(a.kind for a in self.adapters),
                            controlnets=len(self.controlnets), per_row_adapter=bool(self.cross),
                            step_batching=torch_run and bool(self.cross), size_conditioning=self.KIND == "sdxl")

    @property
    def adapters(self) -> list:
        """Every loaded adapter in load order (`adapter` is the first); exported pipelines hold one."""
        return self.__dict__.get("_adapters") or ([self.adapter] if self.adapter is not None else [])

    def set_progress_bar_config(self, **kwargs) -> None:
        """As in diffusers: e.g. `pipe.set_progress_bar_config(disable=True)`."""
        self._progress = kwargs

    @property
    def timings(self) -> dict:
        """Stage timings (ms) of the last call made from this thread: each thread sees its own calls only."""
        return self._last.value

    def set_encoder_cache(self, cache) -> None:
        """Consult `cache` for text and image encodings (engine/server/cache.py's ConditioningCache: `texts(keys,
        compute)` and `images(images, pooled, pipe)`); None: encode every time."""
        self.encoder_cache = cache

    # ---- step-invariant work, once per call ----------------------------------------------------------

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        # -> (N, 77, text_dim) per-token last_hidden_state, padded to max length
        ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0].to(self.dtype)

    def _text_entries(self, texts: list[str]) -> list[tuple]:
        # -> per text (hidden (77, text_dim), pooled projection or None): what the conditioning cache holds
        return [(h, None) for h in self.encode_text(texts)]

    def _encode_texts(self, texts: list[str], call: CallState) -> dict:
        """text -> its UNet tokens, through the encoder cache when one is set; pooled projections (SDXL) go to the
        call."""
        cache = self.encoder_cache
        entries = cache.texts(texts, self._text_entries) if cache is not None else self._text_entries(texts)
        for t, (_, pooled) in zip(texts, entries):
            if pooled is not None:
                call.pooled[t] = pooled
        return {t: hidden for t, (hidden, _) in zip(texts, entries)}

    def _image_features(self, images: list, pooled: bool) -> torch.Tensor:
        # -> (N + 1, ...) as encode_images, through the encoder cache when one is set
        if self.encoder_cache is not None:
            return self.encoder_cache.images(images, pooled, self)
        return self.encode_images(images, pooled=pooled)

    def encode_images(self, images: list[Image.Image], with_zero: bool = True,
                      pooled: bool | None = None) -> torch.Tensor:
        # -> (N + 1, Ni, image_dim) penultimate hidden states; the last row is the all-zero image (with_zero).
        # pooled (default: whether the first adapter is a plain one): (N + 1, projection_dim) pooled embeddings
        pixels = self.image_processor(images=images, return_tensors="pt").pixel_values
        pixels = pixels.to(self.device, self.dtype)
        if pooled is None:
            pooled = self.adapter is not None and self.adapter.kind == "plain"
        if pooled:  # diffusers' convention for plain IP-Adapter:
            embeds = self.image_encoder(pixels).image_embeds       # the pooled embedding; zeros are unconditional
            return torch.cat([embeds, torch.zeros_like(embeds[:1])]) if with_zero else embeds
        if with_zero:
            pixels = torch.cat([pixels, torch.zeros_like(pixels[:1])])
        return self.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]

    # ---- the call --------------------------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(self, prompt=DEFAULT_PROMPT, image=None, instruct=None, negative_prompt=DEFAULT_NEGATIVE, *,
                 scale=0.8, guidance_scale=6.0, instruct_guidance_scale=6.0, image_guidance_scale=1.0,
                 guidance_mode="auto", num_inference_steps=30, height=None, width=None, num_images_per_prompt=1,
                 seed=None, generator=None, scheduler=None, output_type="pil", max_size=None, progress_callback=None,
                 control_image=None, controlnet_conditioning_scale=1.0, control_guidance_start=0.0,
                 control_guidance_end=1.0, guess_mode=False, adapter_masks=None, adapter_start=0.0, adapter_end=1.0):
        """Generate images. `prompt`, `image`, `instruct`, `negative_prompt`, `scale`, the guidance scales,
        `guidance_mode`, `seed`, `adapter_masks`, `adapter_start` and `adapter_end` each take one value or a list
        with one per request; all requests run in one UNet batch. `scale` is a float or an InstantStyle-style
        per-block dict. Returns a list of PIL images (request-major, `num_images_per_prompt` each), or latents with
        output_type="latent". height and width default to the model's native size and may be at most `max_size`
        (default: native x 4). `progress_callback(step, total)` is called after each denoising step (from 1).

        Several adapters (from_pretrained(adapter=[a, b])): a request's `image`, `scale`, `adapter_masks`,
        `adapter_start` and `adapter_end` are one value for every adapter, or a list with one per adapter; so one
        request with two adapters is `image=[[style_img, face_img]], scale=[[0.6, 0.4]]` (the outer list is the
        requests). A list of images in one adapter's entry (or, with one adapter, in the request's) is read as
        several images whose tokens are concatenated, as diffusers does. `adapter_masks`: a mask image per adapter
        (None: everywhere), diffusers' IPAdapterMaskProcessor conventions. `adapter_start`/`adapter_end`: the
        fraction of the steps during which an adapter acts (diffusers' ControlNet rule); outside it that layer is
        the base cross-attention."""
        args = dict(locals())
        del args["self"]
        return self._run(args, CallState())

    def _run(self, args: dict, call: CallState):
        """A call from its keyword arguments (`__call__`'s), with its own state: parse, prepare, denoise, decode."""
        t_start = time.perf_counter()
        reqs = self.parse(args)
        p = self.prepare(reqs, args, call)
        latents = self._denoise(p, args["progress_callback"])
        return self._outputs(latents, [r.num_images for r in reqs], args["output_type"], t_start, call)

    def call_defaults(self) -> dict:
        """The keyword arguments a call takes, with their defaults (what step-level admission fills in)."""
        params = inspect.signature(Pipeline.__call__).parameters  # (SDXL's __call__ wraps this one)
        return {k: p.default for k, p in params.items() if k != "self"}

    def parse(self, args: dict) -> list[Request]:
        """A call's keyword arguments -> its requests, every value checked (EngineError naming it)."""
        return parse_requests(self, args)

    def prepare(self, reqs: list, args: dict, call: CallState) -> Prepared:
        """The step-invariant work of parsed requests (encodings, projector, K/V, scheduler, initial latents), once:
        what the call loop and step-level batching (engine/stepping.py) both run from."""
        if args["output_type"] not in ("pil", "latent"):
            raise EngineError(f"output_type must be 'pil' or 'latent', got {args['output_type']!r}")
        control = self._control_args(args, len(reqs))
        p = self._prepare(reqs, args["num_inference_steps"], args["height"], args["width"], args["scheduler"],
                          args["max_size"], control, call)
        p.guess_mode = bool(control and control["guess_mode"])
        return p

    def _control_args(self, args: dict, n: int) -> dict | None:
        """A call's (or an admission's) ControlNet inputs, their numbers checked before any heavy work; None without
        a ControlNet (engine/controlnet.py; per request: control_image and its scale)."""
        if not self.controlnets:
            if args.get("control_image") is not None:
                raise EngineError("control_image was given but no ControlNet is loaded (from_pretrained(controlnet="
                                  "...), or an export made with --controlnet)")
            return None
        control = dict(control_image=args["control_image"], scale=args["controlnet_conditioning_scale"],
                       start=args["control_guidance_start"], end=args["control_guidance_end"],
                       guess_mode=bool(args["guess_mode"]))
        control_numbers(len(self.controlnets), n, control["scale"], control["start"], control["end"])
        return control

    def _features(self, reqs: list[Request]):
        """Image features once per distinct image. -> ({"hidden"|"pooled": (unique + 1, ...)}, per request per
        adapter the feature rows of its images); the last row of each is the unconditional (zero) image."""
        unique = {id(im): im for r in reqs for slot in r.slots for im in slot.images}  # shared images once
        row = {key: i for i, key in enumerate(unique)}
        kinds = {"pooled" if a.kind == "plain" else "hidden" for a in self.adapters}
        # (plain and IP-Adapter+ together: both outputs of the image encoder)
        feats = {kind: self._image_features(list(unique.values()), kind == "pooled") for kind in kinds}
        return feats, [[[row[id(im)] for im in slot.images] for slot in r.slots] for r in reqs]

    # ---- step-level batching (engine/stepping.py) -----------------------------------------------------------

    def start(self, **kwargs):
        """Admit one request (the keyword arguments of a call, one value each) for step-level batching: its
        step-invariant work runs now. -> an engine.stepping.Flight; `step([flights])` advances several flights of one
        image size, at any steps, by one step in one UNet call; `finish(flight)` decodes a finished one."""
        from .stepping import start
        return start(self, **kwargs)

    def start_many(self, **kwargs) -> list:
        """Admit several requests of one step count, scheduler and size at once (per-request lists, as a call takes
        them): one batch of text, image and projector work, then one flight per request."""
        from .stepping import start_many
        return start_many(self, **kwargs)

    def step(self, flights: list, packer=None) -> None:
        """One denoising step for every flight in one UNet call. packer (engine.stepping.Packer): keeps the packed
        inputs of a steady running set between steps; each caller (the server's stepper) holds its own."""
        from .stepping import step
        step(self, flights, packer)

    def finish(self, flight):
        from .stepping import finish
        return finish(self, flight)

    def finish_many(self, flights: list) -> list:
        """Finished flights' outputs, decoded in one VAE call per image size."""
        from .stepping import finish_many
        return finish_many(self, flights)

    def _denoise(self, p: Prepared, progress_callback=None) -> torch.Tensor:
        """The call's denoising loop -> its final latents."""
        from tqdm.auto import tqdm

        latents = p.latents
        with p.call.timed("denoise_ms", self.device):
            for step, t in enumerate(tqdm(p.sched.timesteps, **{"desc": "denoise", **self._progress}), 1):
                x = p.sched.scale_model_input(latents.index_select(0, p.latent_of_row), t)
                res = None
                if p.control is not None:
                    with torch.profiler.record_function("engine::controlnet"):
                        res = residuals(self.controlnets, p.control, x, t, p.text_rows, step - 1, p.total,
                                        p.guess_mode, p.added)
                with torch.profiler.record_function("engine::unet_step"):
                    eps_rows = self.unet_step(x, t, p.text_rows, p.contexts[step - 1], res, p.added)
                latents = p.update(eps_rows, t, latents)
                if progress_callback is not None:
                    progress_callback(step, p.total)
        p.call.timings["unet_ms_per_step"] = p.call.timings["denoise_ms"] / p.total
        return latents

    def _outputs(self, latents: torch.Tensor, counts: list[int], output_type: str, t_start: float,
                 call: CallState):
        """The call's result from its final latents (counts: images per request). A request whose latents are not
        finite fails alone: the others' images are decoded as they are (the failed ones' as zeros, then dropped)
        and NonFinite carries them."""
        ok = finite_images(latents)
        firsts = [sum(counts[:r]) for r in range(len(counts))]
        bad = [r for r, (at, n) in enumerate(zip(firsts, counts)) if not all(ok[at:at + n])]
        if output_type == "latent":
            out = latents
        else:
            if bad:
                latents = torch.where(torch.tensor(ok, device=latents.device).view(-1, 1, 1, 1), latents, 0.0)
            with call.timed("vae_decode_ms", self.device):
                out = self.decode(latents)
        call.timings["total_ms"] = (time.perf_counter() - t_start) * 1e3
        self._last.value = call.timings
        if bad:
            if output_type != "latent":
                keep = [r not in bad for r, n in enumerate(counts) for _ in range(n)]
                out = [im if good else None for im, good in zip(out, keep)]
            raise NonFinite(bad, out)
        return out

    def _prepare(self, reqs: list, num_inference_steps, height, width, scheduler, max_size, control=None,
                 call: CallState | None = None) -> Prepared:
        """Everything of a call that holds for all its steps: the plan, encodings, projector tokens, K/V, masks,
        each step's adapter context, ControlNet inputs, the scheduler with its timesteps and the initial latents.
        -> what the denoising loop reads (also what engine/stepping.py's flights hold)."""
        call = call if call is not None else CallState()
        height, width = self._size(reqs, height, width, max_size)
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise EngineError(f"steps must be a positive integer, got {num_inference_steps!r}")
        sched = make_scheduler(self.scheduler, scheduler)

        plan = self._plan(reqs)
        with call.timed("text_encoder_ms", self.device):
            emb = self._encode_texts(sorted(plan["texts"]), call)
        text_rows = torch.stack([emb[t] for t in plan["text"]])
        ip_rows = None
        if self.adapter is not None:
            with call.timed("image_encoder_ms", self.device):
                feats, rows = self._features(reqs)
            with call.timed("projector_ms", self.device):
                ip_rows = self._project(feats, rows, emb, plan, call)
        with call.timed("kv_ms", self.device):
            text_rows, ctx = self._unet_inputs(text_rows, ip_rows, reqs, plan, call)
            if self.adapter is not None and any(s.mask is not None for r in reqs for s in r.slots):
                ctx.mask = self._masks(reqs, plan, height, width)
        state = None
        if control is not None:
            state = control_state(self, self.controlnets, reqs, plan, height, width, control["control_image"],
                                  control["scale"], control["start"], control["end"], control["guess_mode"])

        trained = sched.config.num_train_timesteps  # at that many steps diffusers' schedulers index past the end
        if num_inference_steps >= trained:
            raise EngineError(f"steps must be fewer than the scheduler's {trained} training timesteps, "
                              f"got {num_inference_steps}")
        sched.set_timesteps(num_inference_steps, device=self.device)  # before the latents: sets init_noise_sigma
        total = len(sched.timesteps)
        return Prepared(
            height=height, width=width, plan=plan, text_rows=text_rows, control=state, sched=sched, total=total,
            latents=self._latents(reqs, sched, height, width), latent_of_row=plan["latent_of_row"].to(self.device),
            combine=plan["combine"].to(self.device), extra=self.step_kwargs(sched, reqs),
            contexts=self._step_contexts(ctx, reqs, plan, total), call=call)

    def _size(self, reqs: list[Request], height, width, max_size) -> tuple[int, int]:
        f = self.vae_scale_factor
        return check_size(height, width, self.unet.config.sample_size * f, f, max_size)

    def _unet_inputs(self, text_rows, ip_rows, reqs: list[Request], plan: dict, call: CallState):
        """Per-row UNet inputs that hold for every step: text rows and, in the adapter context, the encoder K/V of
        every cross-attention layer and the per-row scales. -> (text rows, context)."""
        kv = precompute_kv(self.unet, self.cross, text_rows, ip_rows)
        index = plan["branch_of_row"].to(self.device)
        ctx = AdapterContext(kv={n: select_rows(kvs, index) for n, kvs in kv.items()}, scale=self._scales(reqs, plan))
        return text_rows.index_select(0, index), ctx

    def unet_step(self, x, t, text_rows, ctx, control=None, added=None) -> torch.Tensor:
        # x: (rows, C, h, w) -> noise prediction per row; control: ControlNet (down, mid) residuals or None;
        # added: SDXL's added conditioning per row ({"text_embeds", "time_ids"}) or None
        step = self._step_component()
        if step is None:
            return self._unet_call(self.unet, x, t, text_rows, ctx, control, added)

        def fast():  # CUDA graphs: static buffers (the residuals, SDXL's added conditioning), replayed
            if self._static is not None:
                return self._static(x, t, text_rows, ctx, control, added)
            return self._unet_call(self.unet, x, t, text_rows, ctx, control, added)

        eager = lambda: self._unet_call(self.unet._call_impl, x, t, text_rows, ctx, control, added)  # noqa: E731
        ref = None if self.dtype == torch.float32 else \
            lambda: self._unet_call(lambda *a, **k: module_fp32(self.unet, *a, **k), x, t, text_rows, ctx, control,
                                    added)
        key = StaticUNet._key(x, t, text_rows, ctx, control, added)
        return self.selfcheck.run(step, key, fast, eager, ref, self.dtype, self.device,
                                  shape=f"rows {x.shape[0]}, latent {describe(x)}")

    @staticmethod
    def _unet_call(unet, x, t, text_rows, ctx, control=None, added=None) -> torch.Tensor:
        extra = {} if control is None else dict(down_block_additional_residuals=control[0],
                                                mid_block_additional_residual=control[1])
        if added is not None:
            extra["added_cond_kwargs"] = added
        return unet(x, t, encoder_hidden_states=text_rows, return_dict=False,
                    cross_attention_kwargs={"adapter": ctx}, **extra)[0]

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        from diffusers.image_processor import VaeImageProcessor
        pixels = self._decode_pixels(latents)
        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor).postprocess(pixels, output_type="pil")

    def _decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        # latents as the scheduler leaves them -> RGB in [-1, 1]
        cfg = self.vae.config
        z = latents / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None):
            z = z + cfg.shift_factor
        return self.vae.decode(z, return_dict=False)[0]

    # ---- helpers ------------------------------------------------------------------------------------------

    def _plan(self, reqs: list[Request]) -> dict:
        """Branch rows (one per request x guidance branch), UNet rows (x images) and the combination weights."""
        instruct = self.adapter is not None and self.adapter.kind == "instruct"
        branches, texts = [], set()
        for r, req in enumerate(reqs):
            mode = resolve_mode(req.guidance_mode, req.instruct, req.guidance_scale, instruct)
            for br, w in branch_weights(mode, req.guidance_scale, req.instruct_guidance_scale, req.image_guidance_scale):
                src = {"prompt": req.prompt, "negative": req.negative_prompt,
                       "instruction": req.instruct, "everything": "everything", "empty": ""}
                row = {"r": r, "w": w, "name": br.name, "image": br.image, "text": src[br.text],
                       "instruct": src[br.instruct], "ip_prompt": src[br.ip_prompt]}
                texts.add(row["text"])
                if instruct:
                    texts.update((row["instruct"], row["ip_prompt"]))
                branches.append(row)
        return expand_rows(branches, texts, reqs)

    def _project(self, feats: dict, image_rows: list, emb: dict, plan: dict, call: CallState):
        """Adapter tokens per branch row: (branch rows, n x Q, cross_dim) for an adapter that reads n images per
        request (their tokens concatenated; an unconditional branch gets n zero-image projections, as diffusers'
        negative embeds). One adapter: that tensor; several: a list, one per adapter."""
        from kernels.projector import projector_forward

        branches = plan["branches"]
        out = []
        for a, adapter in enumerate(self.adapters):
            hidden = feats["pooled" if adapter.kind == "plain" else "hidden"]
            zero = hidden.shape[0] - 1
            n = len(image_rows[0][a])
            image = hidden[[i for b in branches for i in (image_rows[b["r"]][a] if b["image"] else [zero] * n)]]
            instruct = prompt = None
            if adapter.kind == "instruct":
                instruct = torch.stack([emb[b["instruct"]] for b in branches for _ in range(n)])
                prompt = torch.stack([emb[b["ip_prompt"]] for b in branches for _ in range(n)])
            if self._fused_projector and adapter.kind != "plain":
                args, proj = (image, instruct, prompt), adapter.projector
                tokens = self.selfcheck.run(
                    "projector", shape_key(*args, a), lambda: projector_forward(proj, *args), lambda: proj(*args),
                    None if self.dtype == torch.float32 else lambda: module_fp32(proj, *args), self.dtype,
                    self.device, shape=f"image {describe(image)}, text {describe(prompt)}, adapter {a}")
            else:
                tokens = adapter.projector(image, instruct, prompt)
            out.append(tokens if n == 1 else tokens.reshape(len(branches), n * tokens.shape[1], tokens.shape[2]))
        return out if len(out) > 1 else out[0]

    def _scales(self, reqs: list[Request], plan: dict, active: tuple | None = None) -> dict:
        """Per-row scale per cross-attention layer: (rows, 1, 1, 1), or with several adapters a tuple of them.
        active[r][a]: whether adapter a acts for request r at this step (None: every adapter everywhere)."""
        names = list(self.cross)
        per_req = [[expand_scale(self.unet, names, slot.scale) for slot in req.slots] for req in reqs]
        rows = plan["row_request"]

        def column(n, a):  # fp32 whatever the pipeline's dtype: what the kernels take, no per-layer cast per step
            values = [per_req[r][a][n] * (active is None or active[r][a]) for r in rows]
            return torch.tensor(values, device=self.device, dtype=torch.float32).view(-1, 1, 1, 1)
        if len(self.adapters) == 1:
            return {n: column(n, 0) for n in names}
        return {n: tuple(column(n, a) for a in range(len(self.adapters))) for n in names}

    def _step_contexts(self, ctx, reqs: list[Request], plan: dict, total: int) -> list:
        """The adapter context of every step: `ctx` itself unless an adapter has a step range; then, per pattern of
        active adapters, one context sharing ctx's K/V and masks with its own scales (the zeros switch it off)."""
        if self.adapter is None or all(s.start <= 0.0 and s.end >= 1.0 for r in reqs for s in r.slots):
            return [ctx] * total
        made, out = {}, []
        for step in range(total):
            active = tuple(tuple(s.active(step, total) for s in r.slots) for r in reqs)
            if active not in made:
                made[active] = AdapterContext(kv=ctx.kv, scale=self._scales(reqs, plan, active), mask=ctx.mask)
            out.append(made[active])
        return out

    def _masks(self, reqs: list[Request], plan: dict, height: int, width: int) -> dict:
        """Regional masks per cross-attention layer: a tuple (one per adapter) of (rows, Lq) floats, downsampled to
        each layer's queries by diffusers' IPAdapterMaskProcessor (ones for an adapter without a mask)."""
        from diffusers.image_processor import IPAdapterMaskProcessor

        f = self.vae_scale_factor
        processor = IPAdapterMaskProcessor(vae_scale_factor=f)
        full = {}  # (request, adapter) -> (1, 1, H, W) binarised mask
        for r, req in enumerate(reqs):
            for a, slot in enumerate(req.slots):
                if slot.mask is not None:
                    try:
                        full[r, a] = processor.preprocess(slot.mask, height=height, width=width)
                    except (ValueError, TypeError) as e:
                        raise EngineError(f"adapter mask of request {r}, adapter {a} cannot be read: {e}") from e
        rows = plan["row_request"]
        out, cache = {}, {}
        for name, (h, w) in query_lengths(self.unet, height // f, width // f).items():
            lq = h * w
            per_adapter = []
            for a in range(len(self.adapters)):
                cols = []
                for r in range(len(reqs)):
                    if (r, a, lq) not in cache:
                        m = full.get((r, a))
                        cache[r, a, lq] = (torch.ones(1, lq) if m is None else
                                           IPAdapterMaskProcessor.downsample(m[:, 0], 1, lq, 1)[..., 0].float())
                    cols.append(cache[r, a, lq])
                per_adapter.append(torch.cat([cols[r] for r in rows]).to(self.device))
            out[name] = tuple(per_adapter)
        return out

    def _latents(self, reqs: list[Request], sched, height: int, width: int) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor
        f = self.vae_scale_factor
        shape = (self.vae.config.latent_channels, height // f, width // f)  # (the UNet may take more: IP2P's 8)
        parts = [randn_tensor((req.num_images, *shape), generator=req.generator, device=self.device, dtype=self.dtype)
                 for req in reqs]
        return torch.cat(parts) * sched.init_noise_sigma

    def step_kwargs(self, sched, reqs: list[Request]) -> dict:
        # ancestral/stochastic schedulers draw noise each step: one generator per image row, shared within a request
        params = inspect.signature(sched.step).parameters
        # eta 0, as diffusers' pipelines pass it to every scheduler that takes one (DDIM's default; TCD's is 0.3)
        extra = {"eta": 0.0} if "eta" in params else {}
        if "generator" not in params:
            return extra
        if len(reqs) == 1:
            return {**extra, "generator": reqs[0].generator}
        if any(r.generator is None for r in reqs):
            return extra
        return {**extra, "generator": [r.generator for r in reqs for _ in range(r.num_images)]}
