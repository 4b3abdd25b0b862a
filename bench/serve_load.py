"""The load `python -m bench serve` puts on a server: a level (a server at one concurrency or offered rate) and
what it measured (`Level`), one request sent and counted (`send`), the closed loop of C workers (`run_level`), and
around every level the server's RSS and /metrics (`drive`)."""
from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

from ipadapter_instruct.bench.serve_config import ServeBenchError, ServeConfig, request_body

STATUSES = ("200", "429", "503", "504", "other", "transport")
LEVEL_LIMIT_S = 900.0    # a level stops sending after this (a bound in time besides the count)
MAX_RETRIES = 5          # 429 answers retried per request (each counted)
RSS_EVERY_S = 0.5


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


def status_line(lv: Level) -> str:
    return " ".join(f"{k}:{v}" for k, v in lv.statuses.items() if v or k == "200")


def lost(cfg: ServeConfig, lv: Level) -> int:
    """Requests that did not end in 200: answered otherwise, or never sent (the level's time bound)."""
    return (lv.sent if lv.planned is None else lv.planned) - lv.ok


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
    import httpx  # deferred: the optional serve extra

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
    import psutil  # deferred: the optional serve extra
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
    import httpx  # deferred: the optional serve extra

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


def warm_up(name: str, url: str, cfg: ServeConfig, image: str, log) -> None:
    warm = asyncio.run(run_level(name, url, 1, cfg, image, None, 1, cfg.timeout_s))
    if warm.ok != 1:
        raise ServeBenchError(f"server {name}: the warm-up request failed: {status_line(warm)}")
    log(f"{name}: warm-up request {warm.latency_ms[0]:.0f} ms (not counted)")
