"""`python -m bench e2e`: a whole request, our engine against diffusers, on the same weights in one run.

Providers (equal work: `simple` guidance, 2 UNet rows per image, against diffusers' CFG):
- `engine`: the fast path: backend `auto` (on CUDA the fused Triton kernels: decoupled attention, projector,
  GroupNorm+SiLU, GEGLU), channels-last on CUDA, with `--compile` a torch.compiled UNet and with
  `--cuda-graphs` the UNet step replayed from CUDA graphs.
- `engine-eager`: the same pipeline on the plain PyTorch backend (two SDPA calls per cross-attention).
- `diffusers`: StableDiffusionPipeline with its own IP-Adapter+ support (`load_ip_adapter`) on an IP-Adapter+
  file of the same shapes (StableDiffusionXLPipeline with IP-Adapter+ SDXL for the `sdxl`/`tiny-sdxl` presets).
- `tensorrt` (only when named in --providers): the engine's own loop around the TensorRT plans of
  `python -m export trt` (`--engines DIR`, or exported and built here once per weights and dtype into the bench
  cache, for this GPU's arch only); `--cuda-graphs` replays its UNet plan from CUDA graphs. On the CPU, or where
  TensorRT refuses the plans, it is reported as skipped with TensorRT's own reason.
Per provider and batch size (requests per call, one image each): latency p50/p90/p99 per request, images/s,
the per-stage breakdown, achieved TFLOP/s against the FLOP count of the work, peak memory (CUDA's allocator,
per batch size; not measured on the CPU), and the ratio to `diffusers`. Warm-up is one call per provider and
batch size, reported on its own line.

`--task edit` times InstructPix2Pix the same way: `engine`/`engine-eager` are engine.EditPipeline, `diffusers` is
StableDiffusionInstructPix2PixPipeline, on one IP2P folder; each request edits its own copy of one photo (the
engine encodes a photo shared by requests once) at the output size, 3 UNet rows per image in both.
"""
from __future__ import annotations

import gc
import os
import statistics
import time
from dataclasses import dataclass

import torch
from PIL import Image

from engine.selfcheck import summary

from .common import Row, device_name, format_table, git_sha, percentiles, quiet_loaders

PROMPT = "a lighthouse on a cliff at sunset, best quality, high quality"
NEGATIVE = "monochrome, lowres, bad anatomy, worst quality, low quality"
INSTRUCT = "use the style of this image"
EDIT_PROMPT = "make it look like winter"
PROVIDERS = ("engine", "engine-eager", "diffusers")
ACCEPTED = (*PROVIDERS, "tensorrt", "engine-lcm", "+channels-last", "+fused-attention", "+fused-norms", "+cuda-graphs",
            "+compile")  # tensorrt: on request only; "+...": the --ladder steps


@dataclass(frozen=True)
class E2EConfig:
    preset: str = "tiny"
    device: str = "cpu"
    dtype: str = "float32"
    batches: tuple[int, ...] = (1,)
    steps: int = 30
    height: int | None = None
    width: int | None = None
    guidance_mode: str = "simple"
    providers: tuple[str, ...] = PROVIDERS
    scheduler: str | None = None  # every provider's (default: the model's own)
    few_steps: int = 4            # the `engine-lcm` provider: the fast path with the LCM scheduler at this many steps
    repeats: int = 5
    scale: float = 0.8
    guidance_scale: float = 6.0
    compile: bool = False   # torch.compile the engine's UNet (the `engine` provider only)
    cuda_graphs: bool = False  # replay the engine's UNet step from CUDA graphs (the `engine` provider, CUDA)
    profile_dir: str | None = None  # one more request per provider and batch under torch.profiler (bench.profiling)
    engines: str | None = None  # the `tensorrt` provider's plans (default: built into the bench cache)
    trt: str = "auto"           # ... and which TensorRT builds and runs them: auto, full or rtx (engine.trt)
    task: str = "generate"  # or "edit": InstructPix2Pix, three guidance branches (guidance_mode "ip2p")
    image_guidance_scale: float = 1.5  # the edit task's s_I
    adapters: int = 1             # generate: this many adapters at once (the adapter file repeated)
    adapter_masks: bool = False   # ... each in its own vertical stripe of the image


def stripe_masks(n: int, height: int, width: int) -> list:
    """n masks, mask i white on the i-th of n vertical stripes (diffusers' IPAdapterMaskProcessor input)."""
    import numpy as np
    out = []
    for i in range(n):
        m = np.zeros((height, width), dtype=np.uint8)
        m[:, i * width // n:(i + 1) * width // n] = 255
        out.append(Image.fromarray(m))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class FastPath:
    """Which pieces of the engine's fast path a provider turns on."""
    channels_last: bool = False
    fused_attention: bool = False   # the Triton decoupled attention and projector
    fused_norms: bool = False       # GroupNorm+SiLU and GEGLU kernels in the UNet and VAE
    cuda_graphs: bool = False
    compile: bool = False

    def unavailable(self, device: torch.device) -> str | None:
        if device.type != "cuda" and (self.fused_attention or self.fused_norms):
            return "the fused kernels need CUDA (on the CPU the Triton interpreter's timings mean nothing)"
        if device.type != "cuda" and self.cuda_graphs:
            return "CUDA graphs need CUDA"
        return None


# `--ladder`: the fast path one piece at a time, each step the one before plus its name (issue 4: "measure each
# step's effect"); compile is the last step without CUDA graphs (the two are alternatives for the UNet step)
_BASE = FastPath(channels_last=True, fused_attention=True, fused_norms=True)
LADDER = {
    "engine-eager": FastPath(),
    "+channels-last": FastPath(channels_last=True),
    "+fused-attention": FastPath(channels_last=True, fused_attention=True),
    "+fused-norms": _BASE,
    "+cuda-graphs": FastPath(**{**_BASE.__dict__, "cuda_graphs": True}),
    "+compile": FastPath(**{**_BASE.__dict__, "compile": True}),
}


def fast_path(name: str, device: torch.device, cfg: "E2EConfig") -> FastPath:
    if name in ("engine", "engine-lcm"):  # the whole fast path where it applies, plus the options asked for
        cuda = device.type == "cuda"
        return FastPath(channels_last=cuda, fused_attention=cuda, fused_norms=cuda, cuda_graphs=cfg.cuda_graphs,
                        compile=cfg.compile)
    return LADDER[name]


class EngineProvider:
    def __init__(self, name: str, paths: dict, device: torch.device, dtype: torch.dtype, cfg: E2EConfig):
        from engine import EditPipeline, Pipeline, fastpath

        self.name, self.cfg = name, cfg
        # engine-lcm: what an LCM-LoRA user runs, few steps with the LCM scheduler (the weights are the same: random
        # weights do the same work per step whatever they are)
        self.steps, self.scheduler = (cfg.few_steps, "lcm") if name == "engine-lcm" else (cfg.steps, cfg.scheduler)
        fast = fast_path(name, device, cfg)
        backend = "sdpa" if not fast.fused_attention else "auto" if name in ("engine", "engine-lcm") else "triton"
        if cfg.task == "edit":  # InstructPix2Pix: no adapter
            cls, extra = EditPipeline, {}
        else:
            adapter = paths["adapter"] if cfg.adapters == 1 else [paths["adapter"]] * cfg.adapters
            cls, extra = Pipeline, dict(image_encoder=paths["image_encoder"], adapter=adapter)
        self.pipe = cls.from_pretrained(paths["model"], **extra, device=device, dtype=dtype,
                                        attention_backend=backend)
        if fast.fused_attention and not fast.fused_norms:
            for m in (self.pipe.unet, self.pipe.vae):
                fastpath.unfuse(m)
        if fast.channels_last:
            for m in (self.pipe.unet, self.pipe.vae):
                m.to(memory_format=torch.channels_last)
        if fast.compile:
            self.pipe.compile()
        if fast.cuda_graphs:
            self.pipe.enable_cuda_graphs()
        self.pipe.set_progress_bar_config(disable=True)
        self.unet = self.pipe.unet

    def __call__(self, image, batch: int, output_type: str = "pil"):
        c = self.cfg
        if c.task == "edit":
            args = dict(edit_args(c, image, batch), num_inference_steps=self.steps, scheduler=self.scheduler)
            return self.pipe(**args, seed=list(range(batch)), output_type=output_type)
        several = {}
        if c.adapter_masks:
            from engine.loading import native_from_configs
            native, _ = native_from_configs(self.pipe.unet.config, self.pipe.vae.config)
            several["adapter_masks"] = [stripe_masks(c.adapters, c.height or native, c.width or native)] * batch
        return self.pipe(prompt=[PROMPT] * batch, image=[image] * batch, instruct=[INSTRUCT] * batch,
                         negative_prompt=[NEGATIVE] * batch, scale=c.scale, guidance_scale=c.guidance_scale, **several,
                         guidance_mode=c.guidance_mode, num_inference_steps=self.steps, height=c.height,
                         width=c.width, seed=list(range(batch)), output_type=output_type, scheduler=self.scheduler)

    def stages(self) -> dict[str, float]:
        t = self.pipe.timings
        keys = ("text_encoder_ms", "image_encoder_ms", "image_latent_ms", "projector_ms", "kv_ms", "unet_ms_per_step",
                "vae_decode_ms")
        return {k: t[k] for k in keys if k in t}


def build_engines_once(paths: dict, dtype: str, device: torch.device, log=print, trt: str = "auto") -> str:
    """The weights' TensorRT plans in the bench cache (export, then build with `trt` for this GPU's compute
    capability), made once per TensorRT and dtype."""
    import shutil

    from engine.trt import choice_of, load_tensorrt
    from export.onnx import export_onnx
    from export.trt import build_engines

    made_by = choice_of(load_tensorrt(trt))  # plans of one TensorRT do not load in the other
    root = os.path.join(os.path.dirname(os.path.abspath(paths["model"])), f"trt-{made_by}-{dtype}")
    if os.path.isfile(os.path.join(root, "engines", "engines.json")):
        return os.path.join(root, "engines")
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    export_onnx(paths["model"], paths["image_encoder"], paths["adapter"], os.path.join(root, "onnx"), dtype=dtype,
                device=device.type, log=lambda *a: None)
    major, minor = torch.cuda.get_device_capability(device)
    build_engines(os.path.join(root, "onnx"), os.path.join(root, "engines"), archs=(major * 10 + minor,),
                  log=lambda *a: None, trt=made_by)
    log(f"tensorrt: exported and built the plans in {time.perf_counter() - t0:.0f} s ({root})")
    return os.path.join(root, "engines")


class TensorRTProvider(EngineProvider):
    """The engine's loop around the TensorRT plans (engine.trt.runtime.TensorRTPipeline)."""

    def __init__(self, paths: dict, device: torch.device, dtype: torch.dtype, cfg: E2EConfig, log=print):
        from engine import Pipeline

        self.name, self.cfg = "tensorrt", cfg
        engines = cfg.engines or build_engines_once(paths, str(dtype).removeprefix("torch."), device, log, cfg.trt)
        self.pipe = Pipeline.from_pretrained(paths["model"], image_encoder=paths["image_encoder"], device=device,
                                             backend="tensorrt", engines=engines, trt=cfg.trt)
        if cfg.cuda_graphs:
            self.pipe.enable_cuda_graphs()
        self.pipe.set_progress_bar_config(disable=True)
        self.unet = None


class DiffusersProvider:
    name = "diffusers"

    def __init__(self, paths: dict, device: torch.device, dtype: torch.dtype, cfg: E2EConfig):
        from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline
        from transformers import CLIPVisionModelWithProjection

        from engine.loading import _image_processor_class

        self.cfg, self.device = cfg, device
        from engine.loading import is_sdxl_folder

        if cfg.task == "edit":
            self.pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
                paths["model"], safety_checker=None, requires_safety_checker=False)
        else:
            encoder = CLIPVisionModelWithProjection.from_pretrained(paths["image_encoder"]).to(dtype)
            extractor = _image_processor_class().from_pretrained(paths["image_encoder"])
            if is_sdxl_folder(paths["model"]):  # the SDXL presets: diffusers' SDXL pipeline, IP-Adapter+ SDXL
                from diffusers import StableDiffusionXLPipeline
                self.pipe = StableDiffusionXLPipeline.from_pretrained(paths["model"], image_encoder=encoder,
                                                                      feature_extractor=extractor)
            else:
                self.pipe = StableDiffusionPipeline.from_pretrained(
                    paths["model"], safety_checker=None, requires_safety_checker=False, image_encoder=encoder,
                    feature_extractor=extractor)
            plus, n = paths["plus_adapter"], cfg.adapters
            if n == 1:
                self.pipe.load_ip_adapter(os.path.dirname(plus), subfolder="", weight_name=os.path.basename(plus),
                                          image_encoder_folder=None)
            else:
                self.pipe.load_ip_adapter([os.path.dirname(plus)] * n, subfolder=[""] * n,
                                          weight_name=[os.path.basename(plus)] * n, image_encoder_folder=None)
            self.pipe.set_ip_adapter_scale(cfg.scale if n == 1 else [cfg.scale] * n)
        self.pipe.to(device=device, dtype=dtype)  # (not torch_dtype=: deprecated in newer diffusers)
        if cfg.scheduler:  # the same scheduler class on both sides, from the model's own config
            from engine.loading import make_scheduler
            self.pipe.scheduler = make_scheduler(self.pipe.scheduler, cfg.scheduler)
        self.pipe.set_progress_bar_config(disable=True)
        self.unet = self.pipe.unet
        self._times: dict[str, float] = {}
        self._hooks(device)

    def _hooks(self, device):
        # per-module wall time (synchronised) for the stage breakdown, and a profiler range named as the engine's
        # stages ("diffusers::projector", ...); the projector runs inside every UNet call
        p = self.pipe
        ranges = {}
        for key, module in (("text_encoder_ms", p.text_encoder), ("image_encoder_ms", p.image_encoder),
                            ("image_latent_ms", p.vae.encoder), ("projector_ms", p.unet.encoder_hid_proj),
                            ("unet_ms", p.unet), ("vae_decode_ms", p.vae.decoder)):
            if module is None:  # IP2P: no image encoder, no projector
                continue
            def pre(_m, _a, key=key):
                stage = "unet_step" if key == "unet_ms" else key.removesuffix("_ms")
                ranges[key] = torch.profiler.record_function("diffusers::" + stage)
                ranges[key].__enter__()
                _sync(device)
                self._times[key + "_start"] = time.perf_counter()

            def post(_m, _a, _o, key=key):
                _sync(device)
                self._times[key] = self._times.get(key, 0.0) + (time.perf_counter() - self._times[key + "_start"]) * 1e3
                ranges.pop(key).__exit__(None, None, None)
            module.register_forward_pre_hook(pre)
            module.register_forward_hook(post)

    def __call__(self, image, batch: int):
        c = self.cfg
        self._times.clear()
        gens = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
        if c.task == "edit":
            return self.pipe(**edit_args(c, image, batch), generator=gens).images
        extra = {}
        if c.adapter_masks:
            from diffusers.image_processor import IPAdapterMaskProcessor
            size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
            h, w = c.height or size, c.width or size
            masks = IPAdapterMaskProcessor().preprocess(stripe_masks(c.adapters, h, w), height=h, width=w)
            extra["cross_attention_kwargs"] = {"ip_adapter_masks": [masks[i:i + 1] for i in range(c.adapters)]}
        return self.pipe(prompt=[PROMPT] * batch, negative_prompt=[NEGATIVE] * batch,
                         ip_adapter_image=image if c.adapters == 1 else [image] * c.adapters,
                         guidance_scale=c.guidance_scale, num_inference_steps=c.steps, height=c.height,
                         width=c.width, generator=gens, **extra).images

    def stages(self) -> dict[str, float]:
        out = {k: v for k, v in self._times.items() if not k.endswith("_start")}
        if "unet_ms" in out:
            out["unet_ms_per_step"] = out.pop("unet_ms") / self.cfg.steps
        return out


def edit_args(cfg: E2EConfig, image, batch: int) -> dict:
    """The edit task's request for both sides: one photo per request (copies: the engine would encode a photo
    shared by requests once), at the output size (the photo's size is IP2P's output size, as in diffusers)."""
    return dict(prompt=[EDIT_PROMPT] * batch, image=[image] + [image.copy() for _ in range(batch - 1)],
                guidance_scale=cfg.guidance_scale, image_guidance_scale=cfg.image_guidance_scale,
                num_inference_steps=cfg.steps)


def count_flops(provider, image, batch: int) -> float:
    """FLOPs of one call, counted by torch on the plain PyTorch path (Triton kernels are opaque to the counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        provider(image, batch)
    return float(counter.get_total_flops())


def run_e2e(cfg: E2EConfig, paths: dict, log=print) -> tuple[list[Row], str]:
    from engine.demo import draw_condition_image

    from .weights import native_size

    quiet_loaders()
    device, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    env = dict(device=device_name(device), dtype=cfg.dtype, git_sha=git_sha())
    image = draw_condition_image(256)
    if cfg.task == "edit":  # the photo to edit, at the output size (IP2P's output is the photo's size)
        native = native_size(paths["model"])
        image = image.resize((cfg.width or native, cfg.height or native), Image.BICUBIC)
    rows, results = [], {}
    flops = {}
    # FLOPs are counted on a plain PyTorch path (Triton kernels are opaque to torch's counter)
    countable = [n for n in ("engine-eager", "engine", "diffusers") if n in cfg.providers
                 and not (n == "engine" and device.type == "cuda")]
    for name in cfg.providers:
        reason = None if name in ("diffusers", "engine", "engine-lcm", "tensorrt") else LADDER[name].unavailable(device)
        if name == "tensorrt" and device.type != "cuda":
            reason = f"TensorRT engines run on a CUDA GPU; this run is on {device}"
        if reason:
            log(f"{name}: skipped: {reason}")
            continue
        t0 = time.perf_counter()
        if name == "tensorrt":
            from engine.errors import EngineError
            try:
                provider = TensorRTProvider(paths, device, dtype, cfg, log)
            except EngineError as e:  # TensorRT missing, or its own refusal of the plans on this GPU
                log(f"tensorrt: skipped: {e}")
                continue
        else:
            provider = DiffusersProvider(paths, device, dtype, cfg) if name == "diffusers" else \
                EngineProvider(name, paths, device, dtype, cfg)
        log(f"{name}: loaded in {time.perf_counter() - t0:.1f} s")
        for b in cfg.batches:
            if device.type == "cuda":  # peak per batch size: the weights plus this batch's activations
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            images = provider(image, b)
            _sync(device)
            checks = f"; {summary(provider.pipe.fast_path_report())}" if isinstance(provider, EngineProvider) else ""
            log(f"{name}: warm-up, batch {b}: {(time.perf_counter() - t0) * 1e3:.0f} ms (not counted){checks}")
            why = wrong_images(images, b)
            if why:  # a provider whose output is wrong gets no timing
                log(f"{name}: batch {b}: not timed: {why}")
                continue
            if countable and name == countable[0]:
                flops[b] = count_flops(provider, image, b)
            times = []
            for _ in range(cfg.repeats):
                t0 = time.perf_counter()
                provider(image, b)
                _sync(device)
                times.append((time.perf_counter() - t0) * 1e3)
            peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
            results[(name, b)] = dict(times=times, stages=provider.stages(), peak_gib=peak,
                                      steps=getattr(provider, "steps", cfg.steps),
                                      scheduler=getattr(provider, "scheduler", cfg.scheduler))
            if cfg.profile_dir:
                from .profiling import format_counts, profile_request
                stem = os.path.join(cfg.profile_dir, f"{name}-batch{b}")
                calls = profile_request(lambda: provider(image, b), device, stem)
                results[(name, b)]["calls"] = calls
                log(f"{name}: profiled batch {b}: {format_counts(calls)} per call -> {stem}.json.gz")
        del provider
        gc.collect()  # fused modules and hooks hold reference cycles: free the weights before the next provider
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return _report(cfg, env, results, flops, rows)


def wrong_images(images, batch: int) -> str | None:
    """None when a call returned `batch` images of one size with some content, else what is wrong (NaN latents
    decode to a constant image)."""
    import numpy as np

    if len(images) != batch:
        return f"wrong output: {len(images)} images for a batch of {batch}"
    if len({im.size for im in images}) != 1:
        return f"wrong output: images of different sizes {sorted({im.size for im in images})}"
    flat = [i for i, im in enumerate(images) if np.ptp(np.asarray(im)) == 0]
    return f"wrong output: image(s) {flat} are one flat colour" if flat else None


def _quantiles(times: list[float]) -> dict[str, float]:
    keys = ("p20", "p50", "p80", "p90", "p99")
    return dict(zip(keys, percentiles(times, (20, 50, 80, 90, 99))))


def _report(cfg: E2EConfig, env: dict, results: dict, flops: dict, rows: list[Row]) -> tuple[list[Row], str]:
    config = dict(task=cfg.task, preset=cfg.preset, steps=cfg.steps, height=cfg.height, width=cfg.width,
                  guidance_mode=cfg.guidance_mode, guidance_scale=cfg.guidance_scale, repeats=cfg.repeats,
                  compile=cfg.compile, cuda_graphs=cfg.cuda_graphs, adapters=cfg.adapters,
                  adapter_masks=cfg.adapter_masks)
    if cfg.task == "edit":
        config["image_guidance_scale"] = cfg.image_guidance_scale
    lines = []
    for (name, b), r in results.items():
        q = _quantiles(r["times"])
        c = {**config, "batch": b, "p90": q["p90"], "p99": q["p99"], "steps": r.get("steps", cfg.steps),
             "scheduler": r.get("scheduler") or cfg.scheduler or "default"}
        rows.append(Row("e2e", name, "latency", "ms", "batch", b, q["p20"], q["p50"], q["p80"], config=c, **env))
        ips = [b / (q[k] / 1e3) for k in ("p80", "p50", "p20")]
        rows.append(Row("e2e", name, "throughput", "images/s", "batch", b, *ips, config=c, **env))
        tflops = "-"
        if b in flops and r.get("steps", cfg.steps) == cfg.steps:  # (the count is of cfg.steps' work: not engine-lcm's few steps)
            t = [flops[b] / (q[k] / 1e3) / 1e12 for k in ("p80", "p50", "p20")]
            rows.append(Row("e2e", name, "throughput", "TFLOP/s", "batch", b, *t, config=c, **env))
            tflops = f"{t[1]:.3g}"
        if r["peak_gib"] is not None:
            rows.append(Row("e2e", name, "peak_memory", "GiB", "batch", b, *[r["peak_gib"]] * 3, config=c, **env))
        for stage, ms in r["stages"].items():
            rows.append(Row("e2e", name, f"stage:{stage.removesuffix('_ms')}", "ms", "batch", b, ms, ms, ms,
                            config=c, **env))
        for stage, n in r.get("calls", {}).items():  # --profile: how often each stage ran in one call
            rows.append(Row("e2e", name, f"calls:{stage}", "calls", "batch", b, n, n, n, config=c, **env))
        base, eager = results.get(("diffusers", b)), results.get(("engine-eager", b))
        ratio = f"{statistics.median(base['times']) / q['p50']:.2f}x" if base else "-"
        vs_eager = f"{statistics.median(eager['times']) / q['p50']:.2f}x" if eager else "-"
        st = r["stages"]
        lines.append([str(b), name, f"{q['p50']:.1f}", f"{q['p90']:.1f}", f"{q['p99']:.1f}", f"{ips[1]:.3g}",
                      f"{st.get('unet_ms_per_step', float('nan')):.2f}", tflops,
                      f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-", ratio, vs_eager])
    headers = ["batch", "provider", "p50 ms", "p90 ms", "p99 ms", "images/s", "UNet ms/step", "TFLOP/s",
               "peak GiB", "vs diffusers", "vs eager"]
    guidance = cfg.guidance_mode if cfg.task == "generate" else \
        f"{cfg.guidance_mode}, 3 UNet rows per image (s_T {cfg.guidance_scale:g}, s_I {cfg.image_guidance_scale:g})"
    head = (f"device: {env['device']}   dtype: {env['dtype']}   git: {env['git_sha']}   task: {cfg.task}   "
            f"preset: {cfg.preset}   steps: {cfg.steps}   guidance: {guidance}   repeats: {cfg.repeats}")
    if cfg.adapters > 1:
        head += f"   adapters: {cfg.adapters}{' (regional masks)' if cfg.adapter_masks else ''}"
    stage_lines = []
    for (name, b), r in results.items():
        stage_lines.append(f"  {name:<16} batch {b}: " + ", ".join(f"{k.removesuffix('_ms')} {v:.1f} ms"
                                                                   for k, v in r["stages"].items()))
    if cfg.guidance_mode == "full" and any(n == "diffusers" for n, _ in results):
        head += ("\nguidance full: the engine runs 4 UNet rows per image, diffusers' CFG 2; "
                 "`vs diffusers` compares unequal work (simple guidance is the equal-work comparison)")
    text = "\n".join([head, "", format_table(headers, lines), "", "per-stage breakdown (last timed call):",
                      *stage_lines])
    return rows, text
