"""`engine.Pipeline`: IPAdapter-Instruct (or IP-Adapter+) generation on a Stable Diffusion 1.5 UNet.

One call may hold several requests (prompts, images, instructions, scales, guidance modes): all their guidance
branches and images run as one UNet batch per step, each image combined from its own rows only (engine/combine.py),
a request whose latents go non-finite failing alone. The path of a call: parse (engine/requests.py), plan
(engine/plan.py), prepare once (encoders, engine/conditioning.py), denoise (engine/unet_step.py), decode. The
pipeline holds models and settings; a call's state travels in its CallState/Prepared (engine/prepared.py).
"""
from __future__ import annotations

import inspect
import logging
import time

import torch
from PIL import Image
from tqdm.auto import tqdm

from ipadapter_instruct.engine import DEFAULT_NEGATIVE, DEFAULT_PROMPT, moving  # noqa: F401 (imported from here)
from ipadapter_instruct.engine.adapter import Adapter
from ipadapter_instruct.engine.attention import install_processors
from ipadapter_instruct.engine.combine import finite_outputs
from ipadapter_instruct.engine import img2img
from ipadapter_instruct.engine.encoding import EncodingMixin
from ipadapter_instruct.engine.conditioning import features, masks, project, step_contexts, step_kwargs, unet_inputs
from ipadapter_instruct.engine.controlnet import control_state, residuals
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.cuda_graphs import StaticUNet
from ipadapter_instruct.engine.loading import check_size, make_scheduler
from ipadapter_instruct.engine.lora import LoraMixin
from ipadapter_instruct.engine.plan import plan_rows
from ipadapter_instruct.engine.prepared import CallState, LastTimings, Prepared, extra_channels, with_channels
from ipadapter_instruct.engine.pretrained import check_channels, from_pretrained
from ipadapter_instruct.engine.registry import Capabilities
from ipadapter_instruct.engine.requests import Request, control_args, parse_requests
from ipadapter_instruct.engine.results import call_output
from ipadapter_instruct.engine.selfcheck import SelfCheck
from ipadapter_instruct.engine.stepping import SteppingMixin
from ipadapter_instruct.engine.unet_step import choose_kernels, compile_unet, fast_path_report, graphs_changed, run_unet

log = logging.getLogger(__name__)


class Pipeline(LoraMixin, SteppingMixin, EncodingMixin):
    KIND = "sd15"     # the model's maths (engine/registry.py): sd15 | sdxl | edit
    RUNTIME = "torch"  # what runs its graphs: torch | onnx | tensorrt
    STRENGTH = img2img.STRENGTH  # a photo's default strength per task (diffusers' img2img / inpaint defaults)

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, image_encoder=None, image_processor=None,
                 adapter: Adapter | list | None = None, device="cpu", dtype=torch.float32, attention_backend="auto",
                 controlnets=None, verify_fast_path: bool = True):
        check_channels(unet.config.in_channels, vae.config.latent_channels, self.KIND == "edit")
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
        self._static = None  # engine.cuda_graphs.StaticUNet once enable_cuda_graphs() is called
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
                        config=None, trt="auto", verify_fast_path: bool = True, torch_dtype=None) -> "Pipeline":
        """model: a diffusers SD folder (or hub id), or a single-file checkpoint (an original-layout
        `.safetensors`/`.ckpt`, read by diffusers' from_single_file) whose configs come from `config` (a local
        diffusers folder; default: the SD1.5 / InstructPix2Pix ones shipped with the package).
        image_encoder: a CLIPVisionModelWithProjection folder; adapter: a two-key `.bin`/`.safetensors` file, or a
        list of them (several adapters at once). device defaults to cuda when present, dtype (torch_dtype: the same)
        to float16 on cuda, float32 on the CPU. attention_backend: auto | triton | sdpa | reference (`kernels.BACKENDS`)
        for the cross-attention. backend: pytorch, or tensorrt with engines= the folder of `python -m export trt`
        (engine.trt.runtime.TensorRTPipeline: the adapter and dtype are the engines'; model and image_encoder, when
        given, say where the tokenizer, scheduler and image processor are now); trt: with backend tensorrt, which
        TensorRT loads the plans (auto: the one engines.json names, which full / rtx must match). verify_fast_path:
        check each fused kernel, CUDA-graph replay and compiled UNet against its eager path at its first use of a
        shape, falling back where it fails (engine/selfcheck.py; `fast_path_report()` says what runs)."""
        return from_pretrained(cls, model, image_encoder, adapter, device, dtype, attention_backend, backend, engines,
                               controlnet, config, trt, verify_fast_path, torch_dtype=torch_dtype)

    to = moving.move  # diffusers' `pipe.to(device, dtype)` (either, or torch_dtype=): every module moves; -> the pipeline

    def enable_cuda_graphs(self, enabled: bool = True) -> None:
        """Replay the UNet step from CUDA graphs, captured once per shape (rows, size) on first use; a new
        request copies its K/V, scales, text rows and latents into the graph's static buffers and never
        re-captures. CUDA only. Capture has not run on this project's machines yet (no GPU lent); the
        static-buffer path it replays is tested eagerly on the CPU."""
        if enabled and self.device.type != "cuda":
            raise EngineError(f"CUDA graphs need a pipeline on cuda; this one is on {self.device}")
        self._static = StaticUNet(self.unet, capture=True) if enabled else None
        graphs_changed(self)

    def compile(self, **kwargs) -> None:
        """torch.compile the UNet in place (its module names, which the adapter's K/V precompute uses, stay).
        kwargs go to torch.compile (mode, backend, fullgraph, dynamic). The first call at each new shape pays
        the compile time. With the sdpa backend the whole UNet, adapter processors included, is one graph
        (tested with fullgraph=True); the Triton kernels are launched outside the graph. It logs that the next
        call compiles, and how long each new shape's first compiled step took."""
        compile_unet(self, **kwargs)

    def set_attention_backend(self, backend: str) -> None:
        """Run every cross-attention with `backend` (auto | triton | sdpa | reference); fallbacks are logged.
        Where that is triton, the projector, GroupNorm+SiLU and GEGLU run on their fused kernels too."""
        choose_kernels(self, backend)

    def fast_path_report(self) -> dict:
        """What runs fused and what fell back to its eager path, and why: the first-use checks' verdicts
        (engine/selfcheck.py) with each check's cost. {"verify", "fused", "checked", "fell_back", "unverified",
        "check_ms", "checks"}."""
        return fast_path_report(self)

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether UNet steps replay CUDA graphs (step-level batching then pads rows to a bucket)."""
        return self._static is not None

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
                            step_batching=torch_run and bool(self.cross), size_conditioning=self.KIND == "sdxl",
                            inpaint=img2img.inpainting_unet(self))

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

    # ---- the call --------------------------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(self, prompt=None, image=None, instruct=None, negative_prompt=None, *, ip_adapter_image=None,
                 scale=0.8, guidance_scale=6.0, instruct_guidance_scale=6.0, image_guidance_scale=1.0,
                 guidance_mode="auto", num_inference_steps=30, height=None, width=None, num_images_per_prompt=1,
                 seed=None, generator=None, scheduler=None, output_type="pil", max_size=None, progress_callback=None,
                 control_image=None, controlnet_conditioning_scale=1.0, control_guidance_start=0.0,
                 control_guidance_end=1.0, guess_mode=False, adapter_masks=None, adapter_start=0.0, adapter_end=1.0,
                 init_image=None, strength=None, mask_image=None):
        """Generate images. `prompt`, `ip_adapter_image` (the reference image; alias `image`), `instruct`,
        `negative_prompt`, `scale`, the guidance scales, `guidance_mode`, `seed`, `adapter_masks`, `adapter_start` and
        `adapter_end` each take one value or a list with one per request; all requests run in one UNet batch. `scale`
        is a float or an InstantStyle-style per-block dict. Prompts of None: the adapter's defaults, or (no adapter)
        diffusers'. seed None: a fresh one. -> PIL images (request-major, `num_images_per_prompt` each) or latents
        (output_type="latent") with `.images`, `.seeds`, `.timings` (engine/results.py). height and width: the model's
        native size by default, at most `max_size` (default: native x 4). `progress_callback(step, total)` after each
        denoising step (from 1).

        Several adapters (from_pretrained(adapter=[a, b])): a request's `image`, `scale`, `adapter_masks`,
        `adapter_start` and `adapter_end` are one value for every adapter, or a list with one per adapter; so one
        request with two adapters is `image=[[style_img, face_img]], scale=[[0.6, 0.4]]` (the outer list is the
        requests). A list of images in one adapter's entry (or, with one adapter, in the request's) is read as
        several images whose tokens are concatenated, as diffusers does. `adapter_masks`: a mask image per adapter
        (None: everywhere), diffusers' IPAdapterMaskProcessor conventions. `adapter_start`/`adapter_end`: the
        fraction of the steps during which an adapter acts (diffusers' ControlNet rule); outside it that layer is
        the base cross-attention.

        From a photo (per request; engine/img2img.py): `init_image` + `strength` is diffusers' img2img (output: the
        photo's size), with `mask_image` (white = repaint) its inpainting (the native size), on any UNet."""
        args = dict(locals())
        del args["self"]
        return self._run(args, CallState())

    def _run(self, args: dict, call: CallState):
        """A call from its keyword arguments (`__call__`'s), with its own state: parse, prepare, denoise, decode."""
        t_start = time.perf_counter()
        reqs = self.parse(args)
        parts = img2img.groups(reqs, args["num_inference_steps"])
        if len(parts) > 1:  # strengths that start at different steps: one denoising run per start, in order
            return img2img.run_groups(self, reqs, parts, args, call, t_start)
        p = self.prepare(reqs, args, call)
        latents = self._denoise(p, args["progress_callback"])
        return self._outputs(latents, reqs, args["output_type"], t_start, call)

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
        control = control_args(self, args, len(reqs))
        p = self._prepare(reqs, args["num_inference_steps"], args["height"], args["width"], args["scheduler"],
                          args["max_size"], control, call)
        p.guess_mode = bool(control and control["guess_mode"])
        return p

    def _denoise(self, p: Prepared, progress_callback=None) -> torch.Tensor:
        """The call's denoising loop -> its final latents."""
        latents = p.latents
        with p.call.timed("denoise_ms", self.device):
            for step, t in enumerate(tqdm(p.timesteps, **{"desc": "denoise", **self._progress}), 1):
                x = p.sched.scale_model_input(latents.index_select(0, p.latent_of_row), t)
                res = None
                if p.control is not None:
                    with torch.profiler.record_function("engine::controlnet"):
                        res = residuals(self.controlnets, p.control, x, t, p.text_rows, step - 1, p.total,
                                        p.guess_mode, p.added)
                with torch.profiler.record_function("engine::unet_step"):
                    x, ctx = with_channels(x, p.contexts[step - 1])
                    eps_rows = self.unet_step(x, t, p.text_rows, ctx, res, p.added)
                latents = p.update(eps_rows, t, latents)
                if progress_callback is not None:
                    progress_callback(step, p.total)
        p.call.timings["unet_ms_per_step"] = p.call.timings["denoise_ms"] / p.total
        return latents

    def _outputs(self, latents: torch.Tensor, reqs: list, output_type: str, t_start: float, call: CallState):
        """The call's output (engine/results.py); a request whose latents are not finite fails alone (combine.py)."""
        def decode(z):
            with call.timed("vae_decode_ms", self.device):
                return self.decode(z)
        try:
            out = finite_outputs(latents, [r.num_images for r in reqs], output_type, decode)
        finally:
            call.timings["total_ms"] = (time.perf_counter() - t_start) * 1e3
            self._last.value = call.timings
        return call_output(out, [s for r in reqs for s in r.seeds], call.timings)

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
                ctx.mask = masks(self, reqs, plan, height, width)
        state = None
        if control is not None:
            state = control_state(self, self.controlnets, reqs, plan, height, width, control["control_image"],
                                  control["scale"], control["start"], control["end"], control["guess_mode"])

        trained = sched.config.num_train_timesteps  # at that many steps diffusers' schedulers index past the end
        if num_inference_steps >= trained:
            raise EngineError(f"steps must be fewer than the scheduler's {trained} training timesteps, "
                              f"got {num_inference_steps}")
        sched.set_timesteps(num_inference_steps, device=self.device)  # before the latents: sets init_noise_sigma
        timesteps = img2img.cut_schedule(sched, num_inference_steps, reqs)  # (a photo's strength skips the first)
        total, of_row = len(timesteps), plan["latent_of_row"].to(self.device)
        latents, channels, keep = img2img.start_latents(self, reqs, sched, timesteps, height, width, call)
        contexts = step_contexts(self, ctx, reqs, plan, total)
        if channels is not None:  # an inpainting UNet's mask and masked-photo latent per row, beside every context
            contexts = extra_channels(contexts, channels.index_select(0, of_row))
        return Prepared(
            height=height, width=width, plan=plan, text_rows=text_rows, control=state, sched=sched, total=total,
            latents=latents, latent_of_row=of_row, combine=plan["combine"].to(self.device),
            extra=self.step_kwargs(sched, reqs), contexts=contexts, call=call, timesteps=timesteps, keep=keep)

    def _size(self, reqs: list[Request], height, width, max_size) -> tuple[int, int]:
        f = self.vae_scale_factor
        height, width = img2img.photo_size(reqs, height, width, f, bool(self.controlnets))  # (the photo's size)
        return check_size(height, width, self.unet.config.sample_size * f, f, max_size)

    def unet_step(self, x, t, text_rows, ctx, control=None, added=None) -> torch.Tensor:
        return run_unet(self, x, t, text_rows, ctx, control, added)

    def photo_distribution(self, pixels: torch.Tensor):
        """A photo in [-1, 1] -> the VAE's latent distribution of it (`.sample(generator)`, `.mode()`)."""
        return self.vae.encode(pixels).latent_dist

    def photo_latents(self, sample: torch.Tensor) -> torch.Tensor:
        """A sample of a photo's latent distribution -> the latents the UNet works in (times the scaling factor)."""
        return self.vae.config.scaling_factor * sample

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

    # ---- the stages a model kind may change (EditPipeline, SDXLPipeline, exported graphs) ----------------------

    def _plan(self, reqs: list[Request]) -> dict:
        """Branch rows (one per request x guidance branch), UNet rows (x images) and the combination weights."""
        return plan_rows(reqs, self.adapter is not None and self.adapter.kind == "instruct")

    def _features(self, reqs: list[Request]):
        return features(self, reqs)

    def _project(self, feats: dict, image_rows: list, emb: dict, plan: dict, call: CallState):
        return project(self, feats, image_rows, emb, plan)

    def _unet_inputs(self, text_rows, ip_rows, reqs: list[Request], plan: dict, call: CallState):
        return unet_inputs(self, text_rows, ip_rows, reqs, plan)

    def step_kwargs(self, sched, reqs: list[Request]) -> dict:
        """The scheduler step's keyword arguments for these requests (eta, generators)."""
        return step_kwargs(sched, reqs)
