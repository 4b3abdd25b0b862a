"""What every benchmark shares: timing, hardware figures, long-format result rows, the table, the JSON file.

A row is one measurement of one provider on one configuration:
`op, provider, metric, unit, x_name, x, p20, p50, p80, device, dtype, git_sha, config`.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field

import torch

# Peak HBM bandwidth (GB/s) by device-name fragment, for "% of peak" columns; unknown devices get none.
HBM_PEAK_GBS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0,
                "H100": 3350.0, "A100-SXM4-80GB": 2039.0, "A100": 1555.0, "L4": 300.0, "L40S": 864.0}


@dataclass
class Row:
    op: str
    provider: str
    metric: str
    unit: str
    x_name: str
    x: float | int | str
    p20: float
    p50: float
    p80: float
    device: str
    dtype: str
    git_sha: str
    config: dict = field(default_factory=dict)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, torch {torch.__version__})"


def hbm_peak(name: str) -> float | None:
    for fragment, gbs in HBM_PEAK_GBS.items():
        if fragment in name:
            return gbs
    return None


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def percentiles(samples: list[float], qs=(20, 50, 80)) -> tuple[float, ...]:
    """The `qs` percentiles of `samples`, linearly interpolated between the sorted samples (numpy.percentile's
    default method)."""
    if not samples:
        raise ValueError("no samples to take percentiles of")
    s = sorted(samples)
    out = []
    for q in qs:
        pos = (len(s) - 1) * q / 100
        lo = int(pos)
        hi = min(lo + 1, len(s) - 1)
        out.append(s[lo] + (s[hi] - s[lo]) * (pos - lo))
    return tuple(out)


def measure(fn, device: torch.device, repeats: int = 50, warmup: int | None = None) -> tuple[float, float, float]:
    """p20, p50, p80 of `fn()`'s wall time in ms, launch included, after `warmup` untimed calls (default 5 cuda,
    1 cpu). CUDA: one pair of events around each call, the GPU idle before it, so a call whose kernel is shorter
    than its launch (Triton's launcher and argument checks) is timed at its launch."""
    for _ in range(warmup if warmup is not None else (5 if device.type == "cuda" else 1)):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return percentiles(times)


def kernel_samples(fn, rep_ms: float = 20.0) -> list[float]:
    """Per-call GPU time of `fn()` in ms without the launch: `triton.testing.do_bench_cudagraph` captures as many
    back-to-back calls as fill about `rep_ms` in one CUDA graph and replays it (10 times, each sample the replay's
    time over its call count). CUDA only. Only what Triton 3.6 and 3.9 both take: `rep=` and `return_mode="all"`
    (the raw samples; the percentiles are ours, `percentiles`)."""
    from triton.testing import do_bench_cudagraph

    return list(do_bench_cudagraph(fn, rep=rep_ms, return_mode="all"))


def quiet_loaders() -> None:
    """Silence diffusers' and transformers' loading bars and notices: they would bury the benchmark's lines (unless
    `--verbose` asked for them)."""
    from ipadapter_instruct.engine.verbosity import is_verbose

    if is_verbose():
        return
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


def write_json(rows: list[Row], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump([asdict(r) for r in rows], f, indent=1)
    os.replace(tmp, path)


def format_table(headers: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*headers), fmt.format(*("-" * w for w in widths))] +
                     [fmt.format(*line) for line in lines])
