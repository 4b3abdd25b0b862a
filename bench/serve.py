"""`python -m bench serve`: the HTTP server under load, against the same server without batching and against a
diffusers server, on the same weights, one after another.

Servers (each a subprocess on a free 127.0.0.1 port, started, measured at every level, then SIGTERM):
- `engine`: `python -m engine serve` with its request-level dynamic batching (`--max-batch-rows 16
  --max-wait-ms 10`).
- `engine-step`: the same server with `--batching step`: a request joins the running UNet batch at the next step.
- `engine-single`: the same server with `--max-batch-rows 2`: one simple-guidance request per call.
- `diffusers`: `python -m bench.serve_baseline`, StableDiffusionPipeline with `load_ip_adapter` on the IP-Adapter+
  file of the same shapes, one request at a time (equal work: `simple` guidance is 2 UNet rows like its CFG).
Per server and concurrency C: C client workers send N requests in all (a different seed each, one condition image
and instruction), bounded in count and in time; every answer is counted by status, 429 retried after Retry-After.
Reported: images/s (images answered 200 / wall time of the level), client latency p50/p90/p99, the server's queue
wait and compute (means of each 200 body's timings), UNet rows per call (mean from /metrics, max from the bodies),
the server's resident memory (psutil), and the throughput ratios. `--duration-s` is a soak of the engine server.
`--arrival poisson` replaces the closed loop by open-loop arrivals at fixed rates (bench/serve_open.py).
"""
from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .common import Row
from .e2e_config import INSTRUCT, NEGATIVE, PROMPT

SERVERS = ("engine", "engine-step", "engine-single", "diffusers")
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
    max_batch_rows: int = 16      # the `engine` and `engine-step` servers' batching; `engine-single` gets 2
    max_wait_ms: float = 10.0
    guidance_scale: float = 6.0
    arrival: str = "closed"       # closed: --concurrency workers; poisson: open-loop arrivals (serve_open.py)
    rates: tuple[float, ...] = ()  # poisson: requests/s; empty: `--rates auto`, `loads` x the measured capacity
    loads: tuple[float, ...] = (0.5, 0.9, 1.2)
    mix: str = "same"             # the requests' shapes by index (MIXES), the same sequence for every server
    seed: int = 0                 # the arrival times' random generator
    cuda_graphs: bool = False     # the engine servers replay their UNet steps from CUDA graphs (serve --cuda-graphs)
    hostile: float | None = None  # this share of the requests hostile: does a good image change? (serve_hostile.py)


# (steps factor, guidance mode) by request index, cycled: `same` is every request at --steps with simple guidance;
# `mixed` has full guidance (4 UNet rows) and half and double step counts among them, as real traffic would
MIXES = {"same": ((1.0, "simple"),),
         "mixed": ((1.0, "simple"), (1.0, "full"), (0.5, "simple"), (2.0, "simple"))}


def request_body(i: int, cfg: ServeConfig, image_b64: str) -> dict:
    """The i-th request of a level: its own seed, and its steps and guidance mode from the mix."""
    factor, mode = MIXES[cfg.mix][i % len(MIXES[cfg.mix])]
    return dict(prompt=PROMPT, negative_prompt=NEGATIVE, image=image_b64, instruct=INSTRUCT, scale=0.8,
                guidance_scale=cfg.guidance_scale, guidance_mode=mode,
                num_inference_steps=max(1, round(cfg.steps * factor)), seed=i, num_images=1)


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
            "--max-wait-ms", str(cfg.max_wait_ms), *(["--batching", "step"] if name == "engine-step" else []),
            *(["--cuda-graphs"] if cfg.cuda_graphs else [])]


@dataclass
class Level:
    server: str
    concurrency: int | None           # closed loop: client workers
    rate: float | None = None         # open loop: offered requests/s
    load: float | None = None         # `--rates auto`: the rate over the measured capacity
    arrived: float | None = None      # open loop: the rate the arrivals drawn had, (n - 1) / (last - first)
    wall_s: float = 0.0
    sent: int = 0
    ok: int = 0
    images: int = 0
    statuses: dict = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    planned: int | None = None        # requests the level meant to send (None: as many as fit its time)
    latency_ms: list = field(default_factory=list)
    queue_ms: list = field(default_factory=list)
    compute_ms: list = field(default_factory=list)
    batch_rows: list = field(default_factory=list)     # per 200 body: the rows of the call (step) it ran in
    rows_per_call: float | None = None                 # from /metrics: per call, or per UNet step (`per`)
    requests_per_call: float | None = None
    calls: int | None = None
    per: str = "call"                                  # step: --batching step (a request-level call is all steps)
    rss: list = field(default_factory=list)            # (seconds into the level, bytes)

    @property
    def x(self) -> float | int:
        return self.concurrency if self.rate is None else self.rate


async def metrics(client) -> dict[str, float] | None:
    """The server's /metrics as {'name{labels}': value}, or None where it has none (the diffusers baseline)."""
    r = await client.get("/metrics")
    pairs = (line.rpartition(" ") for line in r.text.splitlines() if line and not line.startswith("#"))
    return {key: float(value) for key, _, value in pairs} if r.status_code == 200 else None


def batch_stats(level: Level, before: dict, after: dict) -> None:
    """UNet rows and requests per call from two /metrics readings; per step under --batching step (its
    engine_batch_rows counts each finished request alone)."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in (f"engine_{kind}_{what}_{end}" for kind in (
        "batch", "step") for what in ("rows", "requests") for end in ("sum", "count"))}
    kind = "step" if d["engine_step_rows_count"] > 0 else "batch"
    level.per = "step" if kind == "step" else "call"
    level.calls = int(d[f"engine_{kind}_rows_count"])
    if level.calls:
        level.rows_per_call = d[f"engine_{kind}_rows_sum"] / level.calls
        level.requests_per_call = d[f"engine_{kind}_requests_sum"] / level.calls


async def send(client, body: dict, cfg: ServeConfig, level: Level, t: float) -> None:
    """POST one request, 429 retried after Retry-After while within timeout_s of `t`, and count its answers.
    Latency runs from `t`: when it was sent (closed loop) or when it arrived (open loop: a late send counts)."""
    import httpx

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
    level, counter = Level(server, c, planned=n), itertools.count()

    async def worker(client, end: float) -> None:
        while time.perf_counter() < end:
            i = next(counter)
            if n is not None and i >= n:
                return
            level.sent += 1
            await send(client, request_body(i, cfg, image_b64), cfg, level, time.perf_counter())

    async def load(client, t0: float) -> None:
        await asyncio.gather(*(worker(client, t0 + duration_s) for _ in range(c)))

    return await drive(url, level, pid, cfg, c, load)


async def drive(url: str, level: Level, pid: int | None, cfg: ServeConfig, connections: int, load) -> Level:
    """`await load(client, t0)` sends a level's requests; around it the server's RSS is sampled and its /metrics
    read (batch_stats). level.wall_s: from t0 to the end of `load`."""
    import httpx

    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, timeout=cfg.timeout_s, limits=limits, trust_env=False) as client:
        before = await metrics(client) if level.server != "diffusers" else None
        stop = asyncio.Event()
        t0 = time.perf_counter()
        sampler = asyncio.create_task(sample_rss(pid, level, t0, stop))
        await load(client, t0)
        level.wall_s = time.perf_counter() - t0
        stop.set()
        await sampler
        after = await metrics(client) if before is not None else None
        if before is not None and after is not None:
            batch_stats(level, before, after)
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
    if cfg.arrival == "poisson":
        return run_open(cfg, paths, names, image, log)
    if cfg.hostile is not None:
        from .serve_hostile import run_hostile
        return run_hostile(cfg, paths, log)
    for name in names:
        server = None if cfg.url else ServerProcess(name, server_argv(name, paths, cfg))
        url, pid = cfg.url, None
        try:
            if server is not None:
                url, pid = server.wait_ready(), server.proc.pid
                ready[name] = server.ready_s
                log(f"{name}: ready {server.ready_s:.1f} s after the process started ({url})")
            warm_up(name, url, cfg, image, log)
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
                stop_server(name, server, log)
    from .serve_report import report
    return report(cfg, levels, ready)


def warm_up(name: str, url: str, cfg: ServeConfig, image: str, log) -> None:
    warm = asyncio.run(run_level(name, url, 1, cfg, image, None, 1, cfg.timeout_s))
    if warm.ok != 1:
        raise ServeBenchError(f"server {name}: the warm-up request failed: {status_line(warm)}")
    log(f"{name}: warm-up request {warm.latency_ms[0]:.0f} ms (not counted)")


def stop_server(name: str, server: ServerProcess, log) -> None:
    rc = server.stop()
    if rc != 0 and server.url:  # (one that never got ready said why already)
        log(f"{name}: exited with code {rc} after SIGTERM (expected 0)")


def run_open(cfg: ServeConfig, paths: dict | None, names: tuple, image: str, log) -> tuple[list[Row], str]:
    """`--arrival poisson`: every server started and warmed up first (an idle one takes no CPU), then the rates in
    turn, each on every server (serve_open.OpenLoop.run_all)."""
    import httpx

    from .serve_open import OpenLoop
    from .serve_report import open_report

    ready: dict[str, float] = {}
    procs: dict[str, ServerProcess] = {}
    up: dict[str, tuple[str, int | None]] = {}
    name = names[0]
    try:
        for name in names:
            if cfg.url:
                up[name] = (cfg.url, None)
            else:
                procs[name] = ServerProcess(name, server_argv(name, paths, cfg))
        for name, server in procs.items():
            up[name] = (server.wait_ready(), server.proc.pid)
            ready[name] = server.ready_s
            log(f"{name}: ready {server.ready_s:.1f} s after the process started ({up[name][0]})")
        for name, (url, _) in up.items():
            warm_up(name, url, cfg, image, log)
        levels = OpenLoop(cfg, image, log).run_all(up)
    except httpx.TransportError as e:
        raise ServeBenchError(f"server {name} at {up.get(name, (cfg.url,))[0]}: {type(e).__name__}: {e}") from None
    finally:
        for name, server in procs.items():
            if server.url is None:
                server.stop(kill=True)
            else:
                stop_server(name, server, log)
    return open_report(cfg, levels, ready)


def status_line(lv: Level) -> str:
    return " ".join(f"{k}:{v}" for k, v in lv.statuses.items() if v or k == "200")


def lost(cfg: ServeConfig, lv: Level) -> int:
    """Requests that did not end in 200: answered otherwise, or never sent (the level's time bound)."""
    return (lv.sent if lv.planned is None else lv.planned) - lv.ok


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
    if cfg.hostile is not None and "BROKEN" in table:  # (serve_hostile.py: a good image changed)
        print("python -m bench serve: error: a hostile request reached another request's result", file=sys.stderr)
        return 1
    if a.plot:
        from .plot import plot_serve
        plot_serve(rows, a.plot)
        print(f"plot written to {a.plot}")
    return 0


def config_from_args(a) -> ServeConfig:
    servers = tuple(s for s in a.servers.split(",") if s)
    unknown = [s for s in servers if s not in SERVERS]
    if unknown or not servers:
        raise ServeBenchError(f"unknown server(s) {', '.join(unknown) or '(none given)'}; choose from "
                              f"{', '.join(SERVERS)}", 2)
    if min(a.requests, a.steps, a.max_batch_rows) < 1 or a.timeout_s <= 0 or a.max_wait_ms < 0 or \
            (a.duration_s is not None and a.duration_s <= 0):
        raise ServeBenchError("--requests, --steps and --max-batch-rows must be positive integers, --timeout-s and "
                              "--duration-s positive, --max-wait-ms not negative", 2)
    rates = () if a.rates == "auto" else tuple(a.rates)
    for flag, values in (("--concurrency", a.concurrency), ("--rates", rates), ("--loads", a.loads)):
        if len(set(values)) != len(values):
            raise ServeBenchError(f"{flag} lists a value twice: {','.join(map(str, values))}", 2)
    if a.arrival == "poisson" and a.duration_s is not None:
        raise ServeBenchError("--duration-s is a closed-loop soak; leave out --arrival poisson", 2)
    if a.arrival == "poisson" and not rates and not a.url and "engine" not in servers:
        raise ServeBenchError("--rates auto measures what the request-level server sustains: add engine to "
                              "--servers, or give --rates R1,R2,...", 2)
    if getattr(a, "cuda_graphs", False):
        if a.url:
            raise ServeBenchError("--cuda-graphs starts the engine servers with it; a server given by --url runs "
                                  "as it was started", 2)
        import torch
        if not torch.cuda.is_available():
            raise ServeBenchError("--cuda-graphs needs a CUDA GPU; this machine has none", 2)
    hostile = getattr(a, "hostile", None)
    if hostile is not None:
        from .serve_hostile import valid_share
        if not valid_share(hostile) or a.arrival != "closed" or a.duration_s is not None:
            raise ServeBenchError("--hostile is a share of the requests, above 0 and below 1 (e.g. 0.2), in the closed "
                                  "loop without --duration-s", 2)
    if a.mix == "mixed" and "diffusers" in servers and not a.url:
        raise ServeBenchError("--mix mixed sends full-guidance requests (4 UNet rows), which the diffusers baseline "
                              "does not run: leave diffusers out of --servers", 2)
    return ServeConfig(preset=a.preset, concurrency=tuple(a.concurrency), requests=a.requests, steps=a.steps,
                       url=a.url, servers=servers, duration_s=a.duration_s, timeout_s=a.timeout_s,
                       max_batch_rows=a.max_batch_rows, max_wait_ms=a.max_wait_ms, arrival=a.arrival, rates=rates,
                       loads=tuple(a.loads), mix=a.mix, seed=a.seed, cuda_graphs=getattr(a, "cuda_graphs", False),
                       hostile=hostile)
