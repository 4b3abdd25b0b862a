"""The report of `python -m bench serve`: long-format rows (bench/common.py's Row, op "serve") and the text table,
for the closed loop (x: concurrency) and the open loop (x: offered rate, with engine-step / engine ratios)."""
from __future__ import annotations

import statistics

import torch

from ipadapter_instruct.bench.common import Row, device_name, format_table, git_sha, percentiles
from ipadapter_instruct.bench.serve_config import IMAGE_SIZE, MIXES, ServeConfig
from ipadapter_instruct.bench.serve_load import Level, lost, status_line


def server_env() -> dict:
    """The device, dtype and commit every row of a serve run carries."""
    cuda = torch.cuda.is_available()  # the servers' default device (the same machine: loopback only)
    return dict(device=device_name(torch.device("cuda" if cuda else "cpu")), dtype="float16" if cuda else "float32",
                git_sha=git_sha())


def rss_growth(lv: Level, duration_s: float) -> tuple[float, float, float, float] | None:
    """(warm_at_s, RSS at warm, RSS at the end in bytes, growth %): warm is after the first minute, or after 20 %
    of the run when that is shorter."""
    if not lv.rss:
        return None
    warm_at = min(60.0, 0.2 * duration_s)
    warm = next((b for t, b in lv.rss if t >= warm_at), lv.rss[-1][1])
    end = lv.rss[-1][1]
    return warm_at, warm, end, (end - warm) / warm * 100


LEVEL_HEADERS = ["images/s", "p50 ms", "p90 ms", "p99 ms", "queue ms", "compute ms", "rows/step", "max rows",
                 "RSS MiB", "responses", "lost"]


class Report:
    """The rows of one run (long format, `row`) and each level's table cells (`level`)."""

    def __init__(self, cfg: ServeConfig, ready: dict):
        self.cfg, self.env, self.ready, self.rows = cfg, server_env(), ready, []
        self.config = dict(preset=cfg.preset, steps=cfg.steps, requests=cfg.requests, mix=cfg.mix,
                           guidance_mode="simple" if cfg.mix == "same" else "mixed", timeout_s=cfg.timeout_s,
                           max_wait_ms=cfg.max_wait_ms, image_size=IMAGE_SIZE.get(cfg.preset, 256), url=cfg.url,
                           duration_s=cfg.duration_s, arrival=cfg.arrival)
        for name, s in ready.items():
            self.row(name, "ready", "s", "start", s, x_name="phase")

    def row(self, server, metric, unit, x, values, x_name="concurrency", **extra) -> None:
        p = values if isinstance(values, tuple) else (values,) * 3
        self.rows.append(Row("serve", server, metric, unit, x_name, x, *p, config={**self.config, **extra},
                             **self.env))

    def level(self, lv: Level, **more) -> tuple[dict, list[str]]:
        """Rows of one level (x: its concurrency or rate); the extra config every one of them carries, and the
        table cells from images/s to lost."""
        cfg, name, x, batched = self.cfg, lv.server, lv.x, lv.rows_per_call is not None
        x_name = "concurrency" if lv.rate is None else "rate"
        extra = dict(wall_s=lv.wall_s, sent=lv.sent, ok=lv.ok, lost=lost(cfg, lv), max_batch_rows=None
                     if name == "diffusers" else 2 if name == "engine-single" else cfg.max_batch_rows, **more)

        def row(metric, unit, values, **kw):
            self.row(name, metric, unit, x, values, x_name=x_name, **kw, **extra)

        ips = lv.images / lv.wall_s
        row("throughput", "images/s", ips)
        q = dict(zip(("p20", "p50", "p80", "p90", "p99"), percentiles(lv.latency_ms, (20, 50, 80, 90, 99)))) \
            if lv.latency_ms else {}
        if q:
            row("latency", "ms", (q["p20"], q["p50"], q["p80"]), p90=q["p90"], p99=q["p99"])
            for metric, samples in (("queue_wait", lv.queue_ms), ("compute", lv.compute_ms)):
                row(metric, "ms", percentiles(samples), mean=statistics.fmean(samples))
        if batched:
            row("batch_rows", "rows", lv.rows_per_call, max=max(lv.batch_rows, default=None), calls=lv.calls,
                per=lv.per)
            row("batch_requests", "requests", lv.requests_per_call, calls=lv.calls, per=lv.per)
        for status, count in lv.statuses.items():
            row(f"responses:{status}", "responses", count)
        row("lost", "requests", lost(cfg, lv))
        if lv.rss:
            mib = [b / 2**20 for _, b in lv.rss]
            row("rss", "MiB", percentiles(mib), max=max(mib), samples=len(mib))
        cells = [f"{ips:.3g}", *(f"{q[k]:.0f}" if q else "-" for k in ("p50", "p90", "p99")),
                 *(f"{statistics.fmean(s):.0f}" if s else "-" for s in (lv.queue_ms, lv.compute_ms)),
                 f"{lv.rows_per_call:.1f}" if batched else "-", str(max(lv.batch_rows)) if batched else "-",
                 f"{max(b for _, b in lv.rss) / 2**20:.0f}" if lv.rss else "-", status_line(lv), str(lost(cfg, lv))]
        return extra, cells

    def text(self, headers: list[str], lines: list[list[str]], notes: list[str], what: str) -> str:
        cfg, env = self.cfg, self.env
        mix = "simple guidance (2 UNet rows)" if cfg.mix == "same" else \
            "mixed: " + ", ".join(f"{f:g}x steps {m}" for f, m in MIXES[cfg.mix]) + " (by request index)"
        head = (f"device: {env['device']}   dtype: {env['dtype']}   git: {env['git_sha']}   preset: {cfg.preset}   "
                f"steps: {cfg.steps}   {mix}   {what}")
        if self.ready:
            notes = ["start to ready: " + ", ".join(f"{n} {s:.1f} s" for n, s in self.ready.items()), *notes]
        return "\n".join([head, "", format_table(headers, lines), "", *notes])


# closed loop: the throughput ratios each server reports, against these others at the same concurrency
RATIOS = {"engine": ("engine-single", "diffusers"), "engine-step": ("engine",)}


def report(cfg: ServeConfig, levels: list[Level], ready: dict) -> tuple[list[Row], str]:
    out = Report(cfg, ready)
    lines, notes = [], []
    ips = {(lv.server, lv.concurrency): lv.images / lv.wall_s for lv in levels}
    for lv in levels:
        c, name = lv.concurrency, lv.server
        extra, cells = out.level(lv)
        lines.append([name, str(c), *cells])
        parts = []
        for other in RATIOS.get(name, ()):
            if ips.get((other, c)):
                ratio = ips[(name, c)] / ips[(other, c)]
                out.row(name, f"throughput_ratio:{other}", "x", c, ratio, **extra)
                parts.append(f"{name} / {other} {ratio:.2f}x")
        if parts:
            notes.append(f"  concurrency {c}: " + ", ".join(parts))
    if notes:
        notes.insert(0, "throughput ratios (images/s):")
    for lv in levels if cfg.duration_s is not None else ():
        g = rss_growth(lv, cfg.duration_s)
        if g is None:
            notes.append("RSS: not sampled (a server given by --url)")
            continue
        warm_at, warm, end, pct = g
        out.row(lv.server, "rss_growth", "%", lv.concurrency, pct, warm_at_s=warm_at, warm_mib=warm / 2**20,
                end_mib=end / 2**20, end_at_s=lv.rss[-1][0])
        notes.append(f"RSS of {lv.server} after {warm_at:.0f} s: {warm / 2**20:.0f} MiB; at the end "
                     f"({lv.rss[-1][0]:.0f} s): {end / 2**20:.0f} MiB; growth {pct:+.1f} % (target < 10 %)")
    what = f"soak: {cfg.duration_s:g} s" if cfg.duration_s is not None else f"requests per level: {cfg.requests}"
    return out.rows, out.text(["server", "C", *LEVEL_HEADERS], lines, notes, what)


# the figure: step-level against request-level batching at the same offered rate
STEP, REQUEST = "engine-step", "engine"
TARGET = dict(p99=0.6, p50=1.0, throughput=0.95)  # p99 <= 0.6x, p50 below, throughput not lower (5 % noise)


def open_report(cfg: ServeConfig, levels: list[Level], ready: dict) -> tuple[list[Row], str]:
    """Per server and offered rate, and engine-step / engine at each rate: p99, p50 and throughput ratios. A
    closed-loop level among them is `--rates auto`'s capacity measurement."""
    out = Report(cfg, ready)
    lines, notes, seen = [], [], {}
    for lv in levels:
        if lv.rate is None:  # --rates auto: what the first server sustains in a closed loop
            capacity = lv.images / lv.wall_s
            extra, _ = out.level(lv)
            rates = [x.rate for x in levels if x.server == lv.server and x.rate is not None]
            out.row(lv.server, "capacity", "images/s", lv.concurrency, capacity, loads=list(cfg.loads), rates=rates,
                    **extra)
            notes.append(f"capacity of {lv.server} (closed loop, concurrency {lv.concurrency}, {lv.sent} requests): "
                         f"{capacity:.3g} images/s; offered rates {', '.join(f'{f:g}x' for f in cfg.loads)} of it")
            continue
        extra, cells = out.level(lv, load=lv.load, arrived_rate=lv.arrived)
        seen[(lv.server, lv.rate)] = (lv, extra)
        lines.append([lv.server, f"{lv.rate:g}", f"{lv.load:g}x" if lv.load is not None else "-",
                      f"{lv.arrived:.3g}" if lv.arrived else "-", *cells])
    ratios = []
    for (name, rate), (step, extra) in seen.items():
        request = seen.get((REQUEST, rate), (None,))[0]
        if name != STEP or request is None or not step.latency_ms or not request.latency_ms:
            continue
        (s50, s99), (r50, r99) = (percentiles(x.latency_ms, (50, 99)) for x in (step, request))
        r = dict(p99=s99 / r99, p50=s50 / r50,
                 throughput=(step.images / step.wall_s) / (request.images / request.wall_s) if request.images else 0)
        for metric, value in r.items():
            out.row(STEP, f"{metric}_ratio:{REQUEST}", "x", rate, value, x_name="rate", **extra)
        met = r["p99"] <= TARGET["p99"] and r["p50"] < TARGET["p50"] and r["throughput"] >= TARGET["throughput"]
        load = f" ({step.load:g}x)" if step.load is not None else ""
        ratios.append(f"  {rate:g} requests/s{load}: p99 {s99:.0f} / {r99:.0f} ms = {r['p99']:.2f}x, p50 {s50:.0f} / "
                      f"{r50:.0f} ms = {r['p50']:.2f}x, throughput {r['throughput']:.2f}x: "
                      + ("met" if met else "not met"))
    if ratios:
        notes += [f"{STEP} / {REQUEST} at the same arrivals (target: p99 <= {TARGET['p99']:g}x, p50 below, "
                  f"throughput >= {TARGET['throughput']:g}x):", *ratios]
    notes.append("arrived /s: the rate of the arrival times drawn; images/s: from the first arrival to the last "
                 "answer")
    notes.append("queue ms: mean wait from arrival at the server to the start of its call (engine-step: to joining "
                 "the running batch); rows/step: UNet rows per call (engine-step: per step)")
    what = f"Poisson arrivals (seed {cfg.seed}), {cfg.requests} requests per rate"
    return out.rows, out.text(["server", "rate /s", "load", "arrived /s", *LEVEL_HEADERS], lines, notes, what)
