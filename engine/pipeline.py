"""`engine.Pipeline`: IPAdapter-Instruct (or IP-Adapter+) generation on a Stable Diffusion 1.5 UNet.

One call may hold several requests (different prompts, images, instructions, scales, guidance modes):
all their guidance branches and images run as one UNet batch per step, and a per-call weight matrix
combines branch outputs into each image's noise prediction (see guidance.py). Everything that does not
change across steps is computed once per call: text, instruction and image encodings, projector outputs,
and the K/V of the encoder tokens in every cross-attention layer.
"""
from __future__ import annotations

import inspect
import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image

from kernels import BACKENDS, choose

from . import DEFAULT_NEGATIVE, DEFAULT_PROMPT, DTYPE_NAMES, RUNTIMES, fastpath
from .adapter import Adapter, load_adapter
from .attention import AdapterContext, choose_impls, expand_scale, install_processors, precompute_kv
from .errors import EngineError
from .guidance import branch_weights, resolve_mode
from .loading import check_size, load_base, load_image, load_image_encoder, make_scheduler, resolve
from .lora import LoraMixin

log = logging.getLogger(__name__)

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


@dataclass
class Request:
    prompt: str
    negative_prompt: str
    image: Image.Image | None
    instruct: str | None
    scale: float | dict
    guidance_scale: float
    instruct_guidance_scale: float
    image_guidance_scale: float
    guidance_mode: str
    num_images: int
    generator: torch.Generator | None


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
    images), which latent each row predicts for, and the weight matrix combining rows into latents."""
    offsets = [0]
    for req in reqs:
        offsets.append(offsets[-1] + req.num_images)
    branch_of_row, latent_of_row, cols = [], [], []
    for j, row in enumerate(branches):
        for k in range(reqs[row["r"]].num_images):
            branch_of_row.append(j)
            latent_of_row.append(offsets[row["r"]] + k)
            cols.append(row["w"])
    weights = torch.zeros(offsets[-1], len(cols), dtype=torch.float32)
    weights[torch.tensor(latent_of_row), torch.arange(len(cols))] = torch.tensor(cols, dtype=torch.float32)
    return {"branches": branches, "texts": texts, "text": [b["text"] for b in branches],
            "branch_of_row": torch.tensor(branch_of_row), "latent_of_row": torch.tensor(latent_of_row),
            "row_request": [branches[j]["r"] for j in branch_of_row], "weights": weights}


class Pipeline(LoraMixin):
    EDIT = False  # EditPipeline (engine/edit.py): an InstructPix2Pix UNet

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, image_encoder=None, image_processor=None,
                 adapter: Adapter | None = None, device="cpu", dtype=torch.float32, attention_backend="auto",
                 controlnets=None):
        check_channels(unet.config.in_channels, vae.config.latent_channels, self.EDIT)
        self.device, self.dtype = torch.device(device), dtype
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer, self.scheduler = tokenizer, scheduler
        self.image_encoder, self.image_processor, self.adapter = image_encoder, image_processor, adapter
        extra = (adapter.projector, adapter.layers) if adapter else ()
        self.controlnets = list(controlnets or [])  # engine/controlnet.py
        for m in (unet, vae, text_encoder, image_encoder, *extra, *self.controlnets):
            if m is not None:
                if next(m.parameters()).dtype != dtype:
                    m.to(dtype=dtype)
                m.to(self.device).eval().requires_grad_(False)
        self.cross = install_processors(unet, adapter.layers if adapter else None)
        self._static = None  # engine.graphs.StaticUNet once enable_cuda_graphs() is called
        self.set_attention_backend(attention_backend)
        self._progress = {}
        self.timings: dict[str, float] = {}

    @classmethod
    def from_pretrained(cls, model, image_encoder=None, adapter=None, device=None, dtype=None,
                        attention_backend="auto", backend="pytorch", engines=None, controlnet=None) -> "Pipeline":
        """model: a diffusers SD folder (or hub id); image_encoder: a CLIPVisionModelWithProjection folder;
        adapter: a two-key `.bin`/`.safetensors` file. device defaults to cuda when present, dtype to
        float16 on cuda and float32 on the CPU. attention_backend: auto | triton | sdpa | reference
        (`kernels.BACKENDS`) for the cross-attention. backend: pytorch, or tensorrt with engines= the folder of
        `python -m export trt` (engine.trt.runtime.TensorRTPipeline: the adapter and dtype are the engines'; model
        and image_encoder, when given, say where the tokenizer, scheduler and image processor are now)."""
        if backend not in RUNTIMES:
            raise EngineError(f"unknown backend {backend!r}; choose one of {', '.join(RUNTIMES)}")
        if backend == "tensorrt":
            if controlnet is not None:
                raise EngineError("ControlNet runs on the PyTorch backend (it is not exported yet)")
            return cls._from_engines(model, image_encoder, adapter, device, dtype, engines)
        if engines is not None:
            raise EngineError("engines= is for backend='tensorrt'")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise EngineError("device cuda requested but no CUDA GPU is available")
        dtype = as_dtype(dtype or ("float16" if device.type == "cuda" else "float32"))
        if adapter is not None:  # the cheap checks first, before gigabytes of base weights load
            if image_encoder is None:
                raise EngineError("an adapter needs its image encoder: pass image_encoder= (a CLIP vision folder)")
            if not os.path.isfile(adapter):
                raise EngineError(f"adapter file not found: {os.fspath(adapter)}")
            resolve(image_encoder, "image encoder")
        parts = load_base(model, dtype)
        encoder = processor = loaded = None
        if adapter is not None:
            encoder, processor = load_image_encoder(image_encoder, dtype)
            loaded = load_adapter(adapter, parts["unet"])
            # a plain IP-Adapter reads the projected, pooled embedding; the others the hidden states
            width = encoder.config.projection_dim if loaded.kind == "plain" else encoder.config.hidden_size
            if loaded.projector.config.image_dim != width:
                raise EngineError(f"adapter expects {loaded.projector.config.image_dim}-wide image tokens but the "
                                  f"image encoder makes {encoder.config.hidden_size}-wide ones")
            text_dim = loaded.projector.config.text_dim
            if text_dim is not None and text_dim != parts["text_encoder"].config.hidden_size:
                raise EngineError(f"adapter expects {text_dim}-wide instruction tokens but the text encoder "
                                  f"makes {parts['text_encoder'].config.hidden_size}-wide ones")
        nets = None
        if controlnet is not None:
            from .controlnet import load_controlnets
            nets = load_controlnets(controlnet, parts["unet"], dtype)
        return cls(**parts, image_encoder=encoder, image_processor=processor, adapter=loaded,
                   device=device, dtype=dtype, attention_backend=attention_backend, controlnets=nets)

    @staticmethod
    def _from_engines(model, image_encoder, adapter, device, dtype, engines):
        from .exported import read_manifest, source_paths
        from .trt.runtime import TensorRTPipeline

        if engines is None:
            raise EngineError("backend tensorrt needs the engine folder (engines=, --engines DIR): what "
                              "`python -m export trt --out DIR` wrote")
        manifest = read_manifest(engines)
        if manifest.get("kind") == "edit":
            raise EngineError(f"the engines in {engines} are an InstructPix2Pix export: editing runs on the PyTorch "
                              "backend (EditPipeline) or ONNX Runtime (export.runtime.OnnxEditPipeline); a TensorRT "
                              "edit runtime is not built yet")
        if dtype is not None and as_dtype(dtype) != getattr(torch, manifest["dtype"]):
            raise EngineError(f"the engines in {engines} are {manifest['dtype']}; dtype {dtype} needs engines built "
                              f"from a `python -m export onnx --dtype {str(as_dtype(dtype)).removeprefix('torch.')}` "
                              "export")
        if adapter is not None:  # the adapter is inside unet.plan: only the one it was built with can be meant
            built = source_paths(manifest, engines, ("adapter",))["adapter"]
            if os.path.realpath(adapter) != os.path.realpath(built):
                raise EngineError(f"the engines in {engines} were built with the adapter {built}, not {adapter}: "
                                  "export and build again for another adapter")
        return TensorRTPipeline.from_engines(engines, model, image_encoder, device)

    def enable_cuda_graphs(self, enabled: bool = True) -> None:
        """Replay the UNet step from CUDA graphs, captured once per shape (rows, size) on first use; a new
        request copies its K/V, scales, text rows and latents into the graph's static buffers and never
        re-captures. CUDA only. Capture has not run on this project's machines yet (no GPU lent); the
        static-buffer path it replays is tested eagerly on the CPU."""
        from .graphs import StaticUNet

        if enabled and self.device.type != "cuda":
            raise EngineError(f"CUDA graphs need a pipeline on cuda; this one is on {self.device}")
        self._static = StaticUNet(self.unet, capture=True) if enabled else None

    def compile(self, **kwargs) -> None:
        """torch.compile the UNet in place (its module names, which the adapter's K/V precompute uses, stay).
        kwargs go to torch.compile (mode, backend, fullgraph, dynamic). The first call at each new shape pays
        the compile time. With the sdpa backend the whole UNet, adapter processors included, is one graph
        (tested with fullgraph=True); the Triton kernels are launched outside the graph."""
        self.unet.compile(**kwargs)
        if self._static is not None:
            self._static.entries.clear()  # graphs captured before hold the uncompiled kernels

    def set_attention_backend(self, backend: str) -> None:
        """Run every cross-attention with `backend` (auto | triton | sdpa | reference); fallbacks are logged.
        Where that is triton, the projector, GroupNorm+SiLU and GEGLU run on their fused kernels too."""
        if backend not in BACKENDS:
            raise EngineError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        choose_impls(self.unet, self.cross, self.device, self.dtype, backend)
        self.attention_backend = backend
        if self._static is not None:
            self._static.entries.clear()  # graphs captured before hold the previous backend's kernels
        # the other fused kernels follow the same choice: the projector's blocks (head size 64 in every
        # released checkpoint), GroupNorm+SiLU in the UNet's, VAE's and ControlNets' resnets, GEGLU
        fused = choose(self.device, self.dtype, 64, backend) == "triton"
        self._fused_projector = self.adapter is not None and self.adapter.kind != "plain" and fused
        for m in (self.unet, self.vae, *getattr(self, "controlnets", ())):
            if fused:
                fastpath.fuse(m)
            else:
                fastpath.unfuse(m)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def set_progress_bar_config(self, **kwargs) -> None:
        """As in diffusers: e.g. `pipe.set_progress_bar_config(disable=True)`."""
        self._progress = kwargs

    @contextmanager
    def _timed(self, key: str):
        # wall time into self.timings, and a named range ("engine::projector", ...) in any running torch profiler
        with torch.profiler.record_function("engine::" + key.removesuffix("_ms")):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.timings[key] = self.timings.get(key, 0.0) + (time.perf_counter() - t0) * 1e3

    # ---- step-invariant work, once per call ----------------------------------------------------------

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        # -> (N, 77, text_dim) per-token last_hidden_state, padded to max length
        ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0].to(self.dtype)

    def encode_images(self, images: list[Image.Image], with_zero: bool = True) -> torch.Tensor:
        # -> (N + 1, Ni, image_dim) penultimate hidden states; the last row is the all-zero image (with_zero)
        pixels = self.image_processor(images=images, return_tensors="pt").pixel_values
        pixels = pixels.to(self.device, self.dtype)
        if self.adapter is not None and self.adapter.kind == "plain":  # diffusers' convention for plain IP-Adapter:
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
                 control_guidance_end=1.0, guess_mode=False):
        """Generate images. `prompt`, `image`, `instruct`, `negative_prompt`, `scale`, the guidance scales,
        `guidance_mode` and `seed` each take one value or a list with one per request; all requests run in
        one UNet batch. `scale` is a float or an InstantStyle-style per-block dict. Returns a list of PIL
        images (request-major, `num_images_per_prompt` each), or latents with output_type="latent". height and
        width default to the model's native size and may be at most `max_size` (default: native x 4).
        `progress_callback(step, total)` is called after each denoising step (step counts from 1)."""
        self.timings = {}
        t_start = time.perf_counter()
        reqs = self._requests(locals())
        control = None
        if self.controlnets:  # (ControlNet: engine/controlnet.py; per request: control_image and its scale)
            control = dict(control_image=control_image, scale=controlnet_conditioning_scale,
                           start=control_guidance_start, end=control_guidance_end, guess_mode=bool(guess_mode))
        elif control_image is not None:
            raise EngineError("control_image was given but no ControlNet is loaded (from_pretrained(controlnet=...))")
        return self._generate(reqs, num_inference_steps, height, width, scheduler, output_type, max_size,
                              progress_callback, t_start, control)

    def _generate(self, reqs: list, num_inference_steps, height, width, scheduler, output_type, max_size,
                  progress_callback, t_start, control=None):
        """The call itself, for requests already checked (`_requests`; EditPipeline makes its own)."""
        height, width = self._size(reqs, height, width, max_size)
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise EngineError(f"steps must be a positive integer, got {num_inference_steps!r}")
        if output_type not in ("pil", "latent"):
            raise EngineError(f"output_type must be 'pil' or 'latent', got {output_type!r}")
        sched = make_scheduler(self.scheduler, scheduler)

        plan = self._plan(reqs)
        with self._timed("text_encoder_ms"):
            texts = sorted(plan["texts"])
            emb = dict(zip(texts, self.encode_text(texts)))
        text_rows = torch.stack([emb[t] for t in plan["text"]])
        ip_rows = None
        if self.adapter is not None:
            unique = {id(r.image): r.image for r in reqs}  # a shared condition image is encoded once
            slot = {key: i for i, key in enumerate(unique)}
            with self._timed("image_encoder_ms"):
                hidden = self.encode_images(list(unique.values()))
            with self._timed("projector_ms"):
                ip_rows = self._project(hidden, [slot[id(r.image)] for r in reqs], emb, plan)
        with self._timed("kv_ms"):
            text_rows, ctx = self._unet_inputs(text_rows, ip_rows, reqs, plan)
        state = None
        if control is not None:
            from .controlnet import control_state, residuals
            state = control_state(self, self.controlnets, reqs, plan, height, width, control["control_image"],
                                  control["scale"], control["start"], control["end"], control["guess_mode"])

        trained = sched.config.num_train_timesteps  # at that many steps diffusers' schedulers index past the end
        if num_inference_steps >= trained:
            raise EngineError(f"steps must be fewer than the scheduler's {trained} training timesteps, "
                              f"got {num_inference_steps}")
        sched.set_timesteps(num_inference_steps, device=self.device)  # before the latents: sets init_noise_sigma
        latents = self._latents(reqs, sched, height, width)
        latent_of_row = plan["latent_of_row"].to(self.device)
        weights = plan["weights"].to(self.device)
        extra = self._step_kwargs(sched, reqs)
        from tqdm.auto import tqdm
        with self._timed("denoise_ms"):
            total = len(sched.timesteps)
            for step, t in enumerate(tqdm(sched.timesteps, **{"desc": "denoise", **self._progress}), 1):
                x = sched.scale_model_input(latents.index_select(0, latent_of_row), t)
                res = None
                if state is not None:
                    with torch.profiler.record_function("engine::controlnet"):
                        res = residuals(self.controlnets, state, x, t, text_rows, step - 1, total,
                                        control["guess_mode"])
                with torch.profiler.record_function("engine::unet_step"):
                    eps_rows = self._unet_step(x, t, text_rows, ctx, res)
                eps = (weights @ eps_rows.flatten(1).float()).view(latents.shape).to(latents.dtype)
                latents = sched.step(eps, t, latents, **extra, return_dict=False)[0]
                if progress_callback is not None:
                    progress_callback(step, total)
        self.timings["unet_ms_per_step"] = self.timings["denoise_ms"] / len(sched.timesteps)
        if output_type == "latent":
            self.timings["total_ms"] = (time.perf_counter() - t_start) * 1e3
            return latents
        with self._timed("vae_decode_ms"):
            images = self.decode(latents)
        self.timings["total_ms"] = (time.perf_counter() - t_start) * 1e3
        return images

    def _size(self, reqs: list[Request], height, width, max_size) -> tuple[int, int]:
        f = self.vae_scale_factor
        return check_size(height, width, self.unet.config.sample_size * f, f, max_size)

    def _unet_inputs(self, text_rows, ip_rows, reqs: list[Request], plan: dict):
        """Per-row UNet inputs that hold for every step: text rows and, in the adapter context, the encoder K/V of
        every cross-attention layer and the per-row scales. -> (text rows, context)."""
        kv = precompute_kv(self.unet, self.cross, text_rows, ip_rows)
        index = plan["branch_of_row"].to(self.device)
        ctx = AdapterContext(kv={n: tuple(t.index_select(0, index) if t is not None else None for t in kvs)
                                 for n, kvs in kv.items()}, scale=self._scales(reqs, plan))
        return text_rows.index_select(0, index), ctx

    def _unet_step(self, x, t, text_rows, ctx, control=None) -> torch.Tensor:
        # x: (rows, C, h, w) -> noise prediction per row; control: ControlNet (down, mid) residuals or None
        if self._static is not None:  # CUDA graphs: static buffers (the residuals among them), replayed
            return self._static(x, t, text_rows, ctx, control)
        extra = {} if control is None else dict(down_block_additional_residuals=control[0],
                                                mid_block_additional_residual=control[1])
        return self.unet(x, t, encoder_hidden_states=text_rows, return_dict=False,
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

    def _requests(self, args: dict) -> list[Request]:
        per_request = ("prompt", "image", "instruct", "negative_prompt", "scale", "guidance_scale",
                       "instruct_guidance_scale", "image_guidance_scale", "guidance_mode", "seed", "generator")
        lengths = {len(args[k]) for k in per_request if isinstance(args[k], (list, tuple))}
        if len(lengths) > 1:
            raise EngineError(f"per-request lists must have one length, got lengths {sorted(lengths)}")
        n = lengths.pop() if lengths else 1
        if n == 0:
            raise EngineError("no requests: the per-request lists are empty")
        pick = {k: (list(args[k]) if isinstance(args[k], (list, tuple)) else [args[k]] * n) for k in per_request}
        num = args["num_images_per_prompt"]
        if not isinstance(num, int) or num < 1:
            raise EngineError(f"num_images_per_prompt must be a positive integer, got {num!r}")
        reqs, loaded = [], {}
        for i in range(n):
            p = {k: v[i] for k, v in pick.items()}
            for k in ("guidance_scale", "instruct_guidance_scale", "image_guidance_scale"):
                if not isinstance(p[k], (int, float)) or not math.isfinite(p[k]):
                    raise EngineError(f"{k} must be a finite number, got {p[k]!r}")
            if isinstance(p["scale"], (int, float)) and not math.isfinite(p["scale"]):
                raise EngineError(f"adapter scale must be finite, got {p['scale']!r}")
            for k in ("prompt", "negative_prompt"):
                if not isinstance(p[k], str):
                    raise EngineError(f"{k} must be a string, got {type(p[k]).__name__}")
            img = None
            if self.adapter is None:
                if p["image"] is not None:
                    raise EngineError("a condition image was given but no adapter is loaded (from_pretrained(adapter=...))")
            else:
                if p["image"] is None:
                    raise EngineError("a condition image is required with an adapter")
                if id(p["image"]) not in loaded:
                    loaded[id(p["image"])] = load_image(p["image"])
                img = loaded[id(p["image"])]
                if self.adapter.kind == "instruct" and (not isinstance(p["instruct"], str) or not p["instruct"].strip()):
                    raise EngineError("instruction is empty: say what to take from the image, "
                                      "e.g. 'use the style of this image'")
                if self.adapter.kind in ("plus", "plain") and p["instruct"]:
                    log.warning("the instruction %r is ignored: the loaded adapter is IP-Adapter+, which takes "
                                "no instruction", p["instruct"])
            gen = p["generator"]
            if gen is None and p["seed"] is not None:
                gen = torch.Generator(self.device).manual_seed(int(p["seed"]))
            reqs.append(Request(p["prompt"], p["negative_prompt"], img, p["instruct"], p["scale"],
                                float(p["guidance_scale"]), float(p["instruct_guidance_scale"]),
                                float(p["image_guidance_scale"]), p["guidance_mode"], num, gen))
        return reqs

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

    def _project(self, hidden: torch.Tensor, image_of_req: list[int], emb: dict, plan: dict) -> torch.Tensor:
        # hidden: (unique images + 1, Ni, image_dim), last row the zero image -> (branch rows, Q, cross_dim)
        zero = hidden.shape[0] - 1
        image = hidden[[image_of_req[b["r"]] if b["image"] else zero for b in plan["branches"]]]
        instruct = prompt = None
        if self.adapter.kind == "instruct":
            instruct = torch.stack([emb[b["instruct"]] for b in plan["branches"]])
            prompt = torch.stack([emb[b["ip_prompt"]] for b in plan["branches"]])
        if self._fused_projector:
            from kernels.projector import projector_forward
            return projector_forward(self.adapter.projector, image, instruct, prompt)
        return self.adapter.projector(image, instruct, prompt)

    def _scales(self, reqs: list[Request], plan: dict) -> dict[str, torch.Tensor]:
        names = list(self.cross)
        per_req = [expand_scale(self.unet, names, req.scale) for req in reqs]
        rows = plan["row_request"]
        # fp32 whatever the pipeline's dtype: what the kernels take, so no per-layer cast at every step
        return {n: torch.tensor([per_req[r][n] for r in rows], device=self.device,
                                dtype=torch.float32).view(-1, 1, 1, 1) for n in names}

    def _latents(self, reqs: list[Request], sched, height: int, width: int) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor
        f = self.vae_scale_factor
        shape = (self.vae.config.latent_channels, height // f, width // f)  # (the UNet may take more: IP2P's 8)
        parts = [randn_tensor((req.num_images, *shape), generator=req.generator, device=self.device, dtype=self.dtype)
                 for req in reqs]
        return torch.cat(parts) * sched.init_noise_sigma

    def _step_kwargs(self, sched, reqs: list[Request]) -> dict:
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
