"""`python -m bench serve`: the HTTP server under load, against the same server without batching and against a
diffusers server, on the same weights, one after another.

Servers (each a subprocess on a free 127.0.0.1 port, started, measured at every concurrency level, then SIGTERM):
- `engine`: `python -m engine serve` with its dynamic batching (`--max-batch-rows 16 --max-wait-ms 10`).
- `engine-single`: the same server with `--max-batch-rows 2`: one simple-guidance request per call.
- `diffusers`: `python -m bench.serve_baseline`, StableDiffusionPipeline with `load_ip_adapter` on the IP-Adapter+
  file of the same shapes, one request at a time (equal work: `simple` guidance is 2 UNet rows like its CFG).
Per server and concurrency C: C client workers send N requests in all (a different seed each, one condition image
and instruction), bounded in count and in time; every answer is counted by status, 429 retried after Retry-After.
Reported: images/s (images answered 200 / wall time of the level), client latency p50/p90/p99, the server's queue
wait and compute (means of each 200 body's timings), UNet rows per call (mean from /metrics, max from the bodies),
the server's resident memory (psutil), and the throughput ratios. `--duration-s` is a soak of the engine server.
"""
from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import itertools
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .common import Row, format_table, percentiles
from .e2e import INSTRUCT, NEGATIVE, PROMPT

SERVERS = ("engine", "engine-single", "diffusers")
STATUSES = ("200", "429", "503", "504", "other", "transport")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = {"tiny": 64, "sd15": 512}   # the condition image: the preset's native size
LEVEL_LIMIT_S = 900.0    # a level stops sending after this (a bound in time besides the count)
MAX_RETRIES = 5          # 429 answers retried per request (each counted)
START_TIMEOUT_S = 600.0  # process start to `ready:`
RSS_EVERY_S = 0.5


class ServeBenchError(Exception):
    """A server that did not start (exit 1), or arguments that cannot run (exit 2); one line for the CLI."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class ServeConfig:
    preset: str = "tiny"
    concurrency: tuple[int, ...] = (1, 4, 8, 16)
    requests: int = 32            # per server and concurrency level
    steps: int = 10
    url: str | None = None        # an already running server (loopback only) instead of starting the three
    servers: tuple[str, ...] = SERVERS
    duration_s: float | None = None  # soak: the engine server alone at the highest concurrency for this long
    timeout_s: float = 120.0      # per request, retries included
    max_batch_rows: int = 16      # the `engine` server's batching; `engine-single` gets 2
    max_wait_ms: float = 10.0
    guidance_scale: float = 6.0


def loopback_url(text: str) -> str:
    """`text` if it is an http URL on this machine (127.0.0.0/8, localhost, [::1]); ValueError otherwise."""
    parts = urlsplit(text)
    host = parts.hostname or ""
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if parts.scheme not in ("http", "https") or not local:
        raise ValueError(f"not an http URL on this machine (127.0.0.0/8, localhost or [::1]), got {text!r}")
    return text.rstrip("/")


class ServerProcess:
    """One server subprocess: started at once, `wait_ready()` reads its `ready: URL` line, `stop()` SIGTERMs."""

    def __init__(self, name: str, argv: list[str]):
        self.name, self.t0 = name, time.perf_counter()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.tail: deque[str] = deque(maxlen=40)
        self.url: str | None = None
        self.ready_s: float | None = None
        self._ready, self._eof = threading.Event(), False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:  # drains the pipe for the process's whole life
        for line in self.proc.stdout:
            self.tail.append(line.rstrip())
            if line.startswith("ready:") and not self._ready.is_set():
                self.url, self.ready_s = line.split()[1], time.perf_counter() - self.t0
                self._ready.set()
        self._eof = True
        self._ready.set()

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> str:
        self._ready.wait(timeout)
        if self.url is None:
            try:  # output ended: the process is exiting
                rc = self.proc.wait(5 if self._eof else 0.01)
            except subprocess.TimeoutExpired:
                rc = None
            why = f"exited with code {rc}" if rc is not None else f"was not ready after {timeout:.0f} s"
            self.stop(kill=True)
            raise ServeBenchError(f"server {self.name} {why}: {' | '.join(list(self.tail)[-5:]) or '(no output)'}")
        return self.url

    def stop(self, timeout: float = 60.0, kill: bool = False) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def server_argv(name: str, paths: dict, cfg: ServeConfig) -> list[str]:
    py = [sys.executable, "-m"]
    if name == "diffusers":
        return [*py, "bench.serve_baseline", "--model", paths["model"], "--image-encoder", paths["image_encoder"],
                "--plus-adapter", paths["plus_adapter"], "--port", "0"]
    rows = 2 if name == "engine-single" else cfg.max_batch_rows
    return [*py, "engine", "serve", "--model", paths["model"], "--image-encoder", paths["image_encoder"],
            "--adapter", paths["adapter"], "--port", "0", "--max-batch-rows", str(rows),
            "--max-wait-ms", str(cfg.max_wait_ms)]


@dataclass
class Level:
    server: str
    concurrency: int
    wall_s: float = 0.0
    sent: int = 0
    ok: int = 0
    images: int = 0
    statuses: dict = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    latency_ms: list = field(default_factory=list)
    queue_ms: list = field(default_factory=list)
    compute_ms: list = field(default_factory=list)
    batch_rows: list = field(default_factory=list)     # per 200 body: the rows of the call it ran in
    rows_per_call: float | None = None                 # from /metrics
    requests_per_call: float | None = None
    calls: int | None = None
    rss: list = field(default_factory=list)            # (seconds into the level, bytes)


async def metrics(client) -> dict[str, float] | None:
    """The server's /metrics as {'name{labels}': value}, or None where it has none (the diffusers baseline)."""
    r = await client.get("/metrics")
    pairs = (line.rpartition(" ") for line in r.text.splitlines() if line and not line.startswith("#"))
    return {key: float(value) for key, _, value in pairs} if r.status_code == 200 else None


async def sample_rss(pid: int | None, level: Level, t0: float, stop: asyncio.Event) -> None:
    if pid is None:
        return
    import psutil
    proc = psutil.Process(pid)
    while not stop.is_set():
        try:
            level.rss.append((time.perf_counter() - t0, proc.memory_info().rss))
        except psutil.Error:
            return
        try:
            await asyncio.wait_for(stop.wait(), RSS_EVERY_S)
        except asyncio.TimeoutError:
            pass


async def run_level(server: str, url: str, c: int, cfg: ServeConfig, image_b64: str, pid: int | None,
                    n: int | None, duration_s: float) -> Level:
    """C workers send `n` requests in all (None: as many as fit) until done or `duration_s` has passed."""
    import httpx

    level, counter = Level(server, c), itertools.count()

    async def one(client, i: int) -> None:
        body = dict(prompt=PROMPT, negative_prompt=NEGATIVE, image=image_b64, instruct=INSTRUCT, scale=0.8,
                    guidance_scale=cfg.guidance_scale, guidance_mode="simple", num_inference_steps=cfg.steps,
                    seed=i, num_images=1)
        t = time.perf_counter()
        for attempt in range(MAX_RETRIES + 1):
            left = cfg.timeout_s - (time.perf_counter() - t)
            try:
                r = await asyncio.wait_for(client.post("/v1/generate", json=body), max(left, 0.001))
            except (httpx.TransportError, asyncio.TimeoutError):
                level.statuses["transport"] += 1
                return
            level.statuses[str(r.status_code) if str(r.status_code) in STATUSES else "other"] += 1
            if r.status_code != 429 or attempt == MAX_RETRIES:
                break
            wait = float(r.headers.get("retry-after", "1") or 1)
            await asyncio.sleep(max(0.0, min(wait, cfg.timeout_s - (time.perf_counter() - t))))
        if r.status_code == 200:
            out = r.json()
            level.latency_ms.append((time.perf_counter() - t) * 1e3)
            level.ok += 1
            level.images += len(out["images"])
            tm = out["timings"]
            level.queue_ms.append(tm["queue_ms"])
            level.compute_ms.append(tm["compute_ms"])
            level.batch_rows.append(tm["batch_rows"])

    async def worker(client, end: float) -> None:
        while time.perf_counter() < end:
            i = next(counter)
            if n is not None and i >= n:
                return
            level.sent += 1
            await one(client, i)

    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    async with httpx.AsyncClient(base_url=url, timeout=cfg.timeout_s, limits=limits, trust_env=False) as client:
        before = await metrics(client) if server != "diffusers" else None
        stop = asyncio.Event()
        t0 = time.perf_counter()
        sampler = asyncio.create_task(sample_rss(pid, level, t0, stop))
        await asyncio.gather(*(worker(client, t0 + duration_s) for _ in range(c)))
        level.wall_s = time.perf_counter() - t0
        stop.set()
        await sampler
        after = await metrics(client) if before is not None else None
        if before is not None and after is not None:
            d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in (
                "engine_batch_rows_sum", "engine_batch_requests_sum", "engine_batch_rows_count")}
            level.calls = int(d["engine_batch_rows_count"])
            if level.calls:
                level.rows_per_call = d["engine_batch_rows_sum"] / level.calls
                level.requests_per_call = d["engine_batch_requests_sum"] / level.calls
    return level


def condition_image_b64(preset: str) -> str:
    from engine.demo import draw_condition_image

    buf = io.BytesIO()
    draw_condition_image(IMAGE_SIZE.get(preset, 256)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def run_serve(cfg: ServeConfig, paths: dict | None, log=print) -> tuple[list[Row], str]:
    import httpx

    image = condition_image_b64(cfg.preset)
    levels: list[Level] = []
    ready: dict[str, float] = {}
    soak = cfg.duration_s is not None
    names = ("url",) if cfg.url else ("engine",) if soak else cfg.servers
    for name in names:
        server = None if cfg.url else ServerProcess(name, server_argv(name, paths, cfg))
        url, pid = cfg.url, None
        try:
            if server is not None:
                url, pid = server.wait_ready(), server.proc.pid
                ready[name] = server.ready_s
                log(f"{name}: ready {server.ready_s:.1f} s after the process started ({url})")
            warm = asyncio.run(run_level(name, url, 1, cfg, image, None, 1, cfg.timeout_s))
            if warm.ok != 1:
                raise ServeBenchError(f"server {name}: the warm-up request failed: {status_line(warm)}")
            log(f"{name}: warm-up request {warm.latency_ms[0]:.0f} ms (not counted)")
            for c in ([max(cfg.concurrency)] if soak else cfg.concurrency):
                n, limit = (None, cfg.duration_s) if soak else (cfg.requests, LEVEL_LIMIT_S)
                lv = asyncio.run(run_level(name, url, c, cfg, image, pid, n, limit))
                if n is not None and lv.sent < n:
                    log(f"{name}: concurrency {c}: stopped after {LEVEL_LIMIT_S:.0f} s with {lv.sent} of {n} sent")
                levels.append(lv)
                log(f"{name}: concurrency {c}: {lv.images / lv.wall_s:.3g} images/s, {status_line(lv)}")
        except httpx.TransportError as e:  # /metrics or the warm-up: the server is not there (requests are counted)
            raise ServeBenchError(f"server {name} at {url}: {type(e).__name__}: {e}") from None
        finally:
            if server is not None:
                rc = server.stop()
                if rc != 0 and server.url:  # (one that never got ready said why already)
                    log(f"{name}: exited with code {rc} after SIGTERM (expected 0)")
    return report(cfg, levels, ready)


def status_line(lv: Level) -> str:
    return " ".join(f"{k}:{v}" for k, v in lv.statuses.items() if v or k == "200")


def lost(cfg: ServeConfig, lv: Level) -> int:
    """Requests that did not end in 200: answered otherwise, or never sent (the level's time bound)."""
    return (lv.sent if cfg.duration_s is not None else cfg.requests) - lv.ok


def rss_growth(lv: Level, duration_s: float) -> tuple[float, float, float, float] | None:
    """(warm_at_s, RSS at warm, RSS at the end in bytes, growth %): warm is after the first minute, or after 20 %
    of the run when that is shorter."""
    if not lv.rss:
        return None
    warm_at = min(60.0, 0.2 * duration_s)
    warm = next((b for t, b in lv.rss if t >= warm_at), lv.rss[-1][1])
    end = lv.rss[-1][1]
    return warm_at, warm, end, (end - warm) / warm * 100


def _env() -> dict:
    import torch

    from .common import device_name, git_sha
    cuda = torch.cuda.is_available()  # the servers' default device (the same machine: loopback only)
    return dict(device=device_name(torch.device("cuda" if cuda else "cpu")), dtype="float16" if cuda else "float32",
                git_sha=git_sha())


def report(cfg: ServeConfig, levels: list[Level], ready: dict) -> tuple[list[Row], str]:
    env = _env()
    config = dict(preset=cfg.preset, steps=cfg.steps, requests=cfg.requests, guidance_mode="simple",
                  timeout_s=cfg.timeout_s, max_wait_ms=cfg.max_wait_ms, image_size=IMAGE_SIZE.get(cfg.preset, 256),
                  url=cfg.url, duration_s=cfg.duration_s)
    rows, lines, notes = [], [], []

    def row(server, metric, unit, x, values, x_name="concurrency", **extra):
        p = values if isinstance(values, tuple) else (values,) * 3
        rows.append(Row("serve", server, metric, unit, x_name, x, *p, config={**config, **extra}, **env))

    for name, s in ready.items():
        row(name, "ready", "s", "start", s, x_name="phase")
    ips = {(lv.server, lv.concurrency): lv.images / lv.wall_s for lv in levels}
    for lv in levels:
        c, name, batched = lv.concurrency, lv.server, lv.rows_per_call is not None
        extra = dict(wall_s=lv.wall_s, sent=lv.sent, ok=lv.ok, lost=lost(cfg, lv), max_batch_rows=None
                     if name == "diffusers" else 2 if name == "engine-single" else cfg.max_batch_rows)
        row(name, "throughput", "images/s", c, ips[(name, c)], **extra)
        q = dict(zip(("p20", "p50", "p80", "p90", "p99"), percentiles(lv.latency_ms, (20, 50, 80, 90, 99)))) \
            if lv.latency_ms else {}
        if q:
            row(name, "latency", "ms", c, (q["p20"], q["p50"], q["p80"]), p90=q["p90"], p99=q["p99"], **extra)
            for metric, samples in (("queue_wait", lv.queue_ms), ("compute", lv.compute_ms)):
                row(name, metric, "ms", c, percentiles(samples), mean=statistics.fmean(samples), **extra)
        if batched:
            row(name, "batch_rows", "rows", c, lv.rows_per_call, max=max(lv.batch_rows, default=None),
                calls=lv.calls, **extra)
            row(name, "batch_requests", "requests", c, lv.requests_per_call, calls=lv.calls, **extra)
        for status, count in lv.statuses.items():
            row(name, f"responses:{status}", "responses", c, count, **extra)
        row(name, "lost", "requests", c, lost(cfg, lv), **extra)
        if lv.rss:
            mib = [b / 2**20 for _, b in lv.rss]
            row(name, "rss", "MiB", c, percentiles(mib), max=max(mib), samples=len(mib), **extra)
        parts = []
        for other in ("engine-single", "diffusers"):
            if name == "engine" and ips.get((other, c)):
                ratio = ips[(name, c)] / ips[(other, c)]
                row(name, f"throughput_ratio:{other}", "x", c, ratio, **extra)
                parts.append(f"engine / {other} {ratio:.2f}x")
        if parts:
            notes.append(f"  concurrency {c}: " + ", ".join(parts))
        lines.append([name, str(c), f"{ips[(name, c)]:.3g}",
                      *(f"{q[k]:.0f}" if q else "-" for k in ("p50", "p90", "p99")),
                      *(f"{statistics.fmean(s):.0f}" if s else "-" for s in (lv.queue_ms, lv.compute_ms)),
                      f"{lv.rows_per_call:.1f}" if batched else "-", str(max(lv.batch_rows)) if batched else "-",
                      f"{max(b for _, b in lv.rss) / 2**20:.0f}" if lv.rss else "-", status_line(lv),
                      str(lost(cfg, lv))])
    if notes:
        notes.insert(0, "throughput ratios (images/s):")
    for lv in levels if cfg.duration_s is not None else ():
        g = rss_growth(lv, cfg.duration_s)
        if g is None:
            notes.append("RSS: not sampled (a server given by --url)")
            continue
        warm_at, warm, end, pct = g
        row(lv.server, "rss_growth", "%", lv.concurrency, pct, warm_at_s=warm_at, warm_mib=warm / 2**20,
            end_mib=end / 2**20, end_at_s=lv.rss[-1][0])
        notes.append(f"RSS of {lv.server} after {warm_at:.0f} s: {warm / 2**20:.0f} MiB; at the end "
                     f"({lv.rss[-1][0]:.0f} s): {end / 2**20:.0f} MiB; growth {pct:+.1f} % (target < 10 %)")
    headers = ["server", "C", "images/s", "p50 ms", "p90 ms", "p99 ms", "queue ms", "compute ms", "rows/call",
               "max rows", "RSS MiB", "responses", "lost"]
    head = (f"device: {env['device']}   dtype: {env['dtype']}   git: {env['git_sha']}   preset: {cfg.preset}   "
            f"steps: {cfg.steps}   guidance: simple (2 UNet rows)   "
            + (f"soak: {cfg.duration_s:g} s" if cfg.duration_s is not None else f"requests per level: {cfg.requests}"))
    if ready:
        notes.insert(0, "start to ready: " + ", ".join(f"{n} {s:.1f} s" for n, s in ready.items()))
    return rows, "\n".join([head, "", format_table(headers, lines), "", *notes])


def serve_main(a) -> int:
    from .common import write_json
    from .weights import bench_weights

    try:
        cfg = config_from_args(a)
        rows, table = run_serve(cfg, None if cfg.url else bench_weights(cfg.preset, a.cache))
    except ServeBenchError as e:
        print(f"python -m bench serve: error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"\n{table}")
    write_json(rows, a.json)
    print(f"\n{len(rows)} rows written to {a.json}")
    return 0


def config_from_args(a) -> ServeConfig:
    servers = tuple(s for s in a.servers.split(",") if s)
    unknown = [s for s in servers if s not in SERVERS]
    if unknown or not servers:
        raise ServeBenchError(f"unknown server(s) {', '.join(unknown) or '(none given)'}; choose from "
                              f"{', '.join(SERVERS)}", 2)
    if len(set(a.concurrency)) != len(a.concurrency):
        raise ServeBenchError(f"--concurrency lists a level twice: {','.join(map(str, a.concurrency))}", 2)
    if min(a.requests, a.steps, a.max_batch_rows) < 1 or a.timeout_s <= 0 or a.max_wait_ms < 0 or \
            (a.duration_s is not None and a.duration_s <= 0):
        raise ServeBenchError("--requests, --steps and --max-batch-rows must be positive integers, --timeout-s and "
                              "--duration-s positive, --max-wait-ms not negative", 2)
    return ServeConfig(preset=a.preset, concurrency=tuple(a.concurrency), requests=a.requests, steps=a.steps,
                       url=a.url, servers=servers, duration_s=a.duration_s, timeout_s=a.timeout_s,
                       max_batch_rows=a.max_batch_rows, max_wait_ms=a.max_wait_ms)
