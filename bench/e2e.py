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
the per-stage breakdown (ending in `other`: the call's wall time less its named stages), achieved TFLOP/s against the FLOP count of the work, peak memory (CUDA's allocator,
per batch size; not measured on the CPU), and the ratio to `diffusers`. Warm-up is one call per provider and
batch size, reported on its own line.

`--task edit` times InstructPix2Pix the same way: `engine`/`engine-eager` are engine.EditPipeline, `diffusers` is
StableDiffusionInstructPix2PixPipeline, on one IP2P folder; each request edits its own copy of one photo (the
engine encodes a photo shared by requests once) at the output size, 3 UNet rows per image in both.

This module is the harness (each provider loaded, warmed up, checked, timed); the providers are in e2e_providers.py,
the configuration and the prompts in e2e_config.py, the rows and the table in e2e_report.py.
"""
from __future__ import annotations

import gc
import os
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from ipadapter_instruct.engine.demo import draw_condition_image
from ipadapter_instruct.engine.selfcheck import summary

from ipadapter_instruct.bench.common import Row, device_name, git_sha, quiet_loaders
from ipadapter_instruct.bench.e2e_config import E2EConfig
from ipadapter_instruct.bench.e2e_providers import EngineProvider, load_provider, sync
from ipadapter_instruct.bench.e2e_report import report
from ipadapter_instruct.bench.profiling import format_counts, profile_request
from ipadapter_instruct.bench.weights import native_size


def run_e2e(cfg: E2EConfig, paths: dict, log=print) -> tuple[list[Row], str]:
    quiet_loaders()
    device, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    env = dict(device=device_name(device), dtype=cfg.dtype, git_sha=git_sha())
    image = draw_condition_image(256)
    if cfg.task == "edit":  # the photo to edit, at the output size (IP2P's output is the photo's size)
        native = native_size(paths["model"])
        image = image.resize((cfg.width or native, cfg.height or native), Image.BICUBIC)
    results, flops = {}, {}
    # FLOPs are counted on a plain PyTorch path (Triton kernels are opaque to torch's counter)
    countable = [n for n in ("engine-eager", "engine", "diffusers") if n in cfg.providers
                 and not (n == "engine" and device.type == "cuda")]
    counts = lambda name: bool(countable) and name == countable[0]  # noqa: E731
    if cfg.interleave:  # every provider loaded at once, their timed calls taken in turn
        loaded = [p for p in (loaded_provider(n, paths, device, dtype, cfg, log) for n in cfg.providers) if p]
        for b in cfg.batches:
            ready = [(p, warm_up(p, image, b, cfg, device, log, counts(p.name))) for p in loaded]
            ready = [(p, w) for p, w in ready if w is not None]
            times = {p.name: [] for p, _ in ready}
            for _ in range(cfg.repeats):
                for p, _ in ready:
                    times[p.name].append(timed_call(p, image, b, device))
            for p, count in ready:
                results[(p.name, b)] = finish(p, image, b, cfg, device, log, times[p.name])
                if count[0] is not None:
                    flops[b] = count[0]
        return report(cfg, env, results, flops, [])
    for name in cfg.providers:
        provider = loaded_provider(name, paths, device, dtype, cfg, log)
        if provider is None:
            continue
        for b in cfg.batches:
            measured = measure(provider, image, b, cfg, device, log, counts(name))
            if measured is not None:
                results[(name, b)], count = measured
                if count is not None:
                    flops[b] = count
        del provider
        gc.collect()  # fused modules and hooks hold reference cycles: free the weights before the next provider
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return report(cfg, env, results, flops, [])


def loaded_provider(name: str, paths: dict, device, dtype, cfg: E2EConfig, log):
    t0 = time.perf_counter()
    provider = load_provider(name, paths, device, dtype, cfg, log)
    if provider is not None:
        log(f"{name}: loaded in {time.perf_counter() - t0:.1f} s")
    return provider


def measure(provider, image, b: int, cfg: E2EConfig, device: torch.device, log,
            with_flops: bool) -> tuple[dict, float | None] | None:
    """One provider at batch size b: a warm-up call whose images are checked (wrong output: None, no timing), the
    FLOPs of a call where asked, cfg.repeats timed calls and the peak memory, and under `--profile` one more call.
    -> (the result the report reads, the FLOPs or None)."""
    if device.type == "cuda":  # peak per batch size: the weights plus this batch's activations
        torch.cuda.reset_peak_memory_stats(device)
    warm = warm_up(provider, image, b, cfg, device, log, with_flops)
    if warm is None:
        return None
    times = [timed_call(provider, image, b, device) for _ in range(cfg.repeats)]
    return finish(provider, image, b, cfg, device, log, times), warm[0]


def warm_up(provider, image, b: int, cfg: E2EConfig, device, log, with_flops: bool) -> tuple | None:
    """The warm-up call, its images checked, and the FLOPs of a call where asked -> (FLOPs or None,), or None where
    the images are wrong (logged: that provider gets no timing)."""
    name = provider.name
    t0 = time.perf_counter()
    images = provider(image, b)
    sync(device)
    checks = f"; {summary(provider.pipe.fast_path_report())}" if isinstance(provider, EngineProvider) else ""
    log(f"{name}: warm-up, batch {b}: {(time.perf_counter() - t0) * 1e3:.0f} ms (not counted){checks}")
    why = wrong_images(images, b)
    if why:  # a provider whose output is wrong gets no timing
        log(f"{name}: batch {b}: not timed: {why}")
        return None
    return (count_flops(provider, image, b) if with_flops else None,)


def timed_call(provider, image, b: int, device) -> float:
    t0 = time.perf_counter()
    provider(image, b)
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def finish(provider, image, b: int, cfg: E2EConfig, device, log, times: list[float]) -> dict:
    """The result the report reads, from the provider's timed calls `times` (its stages: the last call's), the peak
    memory (not with --interleave: the others' weights share the device), and under `--profile` one more call."""
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 \
        if device.type == "cuda" and not cfg.interleave else None
    result = dict(times=times, stages=provider.stages(times[-1]), peak_gib=peak,
                  steps=getattr(provider, "steps", cfg.steps), scheduler=getattr(provider, "scheduler", cfg.scheduler))
    if cfg.profile_dir:
        stem = os.path.join(cfg.profile_dir, f"{provider.name}-batch{b}")
        result["calls"] = profile_request(lambda: provider(image, b), device, stem)
        log(f"{provider.name}: profiled batch {b}: {format_counts(result['calls'])} per call -> {stem}.json.gz")
    return result


def count_flops(provider, image, batch: int) -> float:
    """FLOPs of one call, counted by torch on the plain PyTorch path (Triton kernels are opaque to the counter)."""
    with FlopCounterMode(display=False) as counter:
        provider(image, batch)
    return float(counter.get_total_flops())


def wrong_images(images, batch: int) -> str | None:
    """None when a call returned `batch` images of one size with some content, else what is wrong (NaN latents
    decode to a constant image)."""
    if len(images) != batch:
        return f"wrong output: {len(images)} images for a batch of {batch}"
    if len({im.size for im in images}) != 1:
        return f"wrong output: images of different sizes {sorted({im.size for im in images})}"
    flat = [i for i, im in enumerate(images) if np.ptp(np.asarray(im)) == 0]
    return f"wrong output: image(s) {flat} are one flat colour" if flat else None
