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

This module runs a measurement from start to end; the pieces it uses import nothing back: serve_config.py (the
configuration, the requests), serve_servers.py (the server subprocesses), serve_load.py (a level's load and what it
measured), serve_open.py, serve_hostile.py and serve_report.py.
"""
from __future__ import annotations

import asyncio
import sys

import torch

from ipadapter_instruct.bench.common import Row, write_json
from ipadapter_instruct.bench.plot import plot_serve
from ipadapter_instruct.bench.serve_config import SERVERS, ServeBenchError, ServeConfig, condition_image_b64
from ipadapter_instruct.bench.serve_hostile import run_hostile, valid_share
from ipadapter_instruct.bench.serve_load import LEVEL_LIMIT_S, Level, run_level, status_line, warm_up
from ipadapter_instruct.bench.serve_open import OpenLoop
from ipadapter_instruct.bench.serve_report import open_report, report
from ipadapter_instruct.bench.serve_servers import ServerProcess, server_argv, stop_server
from ipadapter_instruct.bench.weights import bench_weights


def run_serve(cfg: ServeConfig, paths: dict | None, log=print) -> tuple[list[Row], str]:
    import httpx  # deferred: the optional serve extra

    image = condition_image_b64(cfg.preset)
    levels: list[Level] = []
    ready: dict[str, float] = {}
    soak = cfg.duration_s is not None
    names = ("url",) if cfg.url else ("engine",) if soak else cfg.servers
    if cfg.arrival == "poisson":
        return run_open(cfg, paths, names, image, log)
    if cfg.hostile is not None:
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
    return report(cfg, levels, ready)


def run_open(cfg: ServeConfig, paths: dict | None, names: tuple, image: str, log) -> tuple[list[Row], str]:
    """`--arrival poisson`: every server started and warmed up first (an idle one takes no CPU), then the rates in
    turn, each on every server (serve_open.OpenLoop.run_all)."""
    import httpx  # deferred: the optional serve extra

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


def serve_main(a) -> int:
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
        if not torch.cuda.is_available():
            raise ServeBenchError("--cuda-graphs needs a CUDA GPU; this machine has none", 2)
    hostile = getattr(a, "hostile", None)
    if hostile is not None:
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
