"""`python -m bench serve --arrival poisson`: open-loop load. Requests arrive at the times of a Poisson process
(exponential gaps from a seeded generator), each sent at its time whatever the server is doing, so a server that
falls behind builds a queue instead of slowing its clients down as a closed loop would. Every server gets the
same arrival times and the same request sequence (seeds, and steps and guidance from `--mix`). Per server and
offered rate: `--requests` arrivals, those due within LEVEL_LIMIT_S sent; latency runs from a request's arrival
to its answer; throughput is images over the time from the first arrival to the last answer.

`--rates auto` first measures what the request-level server (`engine`, run first) sustains: its closed-loop
throughput with as many workers as fill `--max-batch-rows` with simple-guidance requests, each worker
CAPACITY_ROUNDS requests. The offered rates are `--loads` times it (0.5x, 0.9x, 1.2x by default: a lighter load,
one it just sustains, a heavier one); every server then runs those rates.
"""
from __future__ import annotations

import asyncio
import random
import time

from ipadapter_instruct.bench.serve_config import ServeBenchError, ServeConfig, request_body
from ipadapter_instruct.bench.serve_load import LEVEL_LIMIT_S, Level, drive, run_level, send, status_line

CAPACITY_ROUNDS = 3  # `--rates auto`: requests per closed-loop worker when measuring capacity


def arrival_times(rate: float, n: int, seed: int) -> list[float]:
    """n arrival times in seconds after the start, increasing: a Poisson process of `rate` per second
    (independent exponential gaps of mean 1 / rate from random.Random(seed); the same seed, the same times)."""
    if rate <= 0 or n < 0:
        raise ValueError(f"a Poisson process needs a positive rate and a count >= 0, got rate {rate} and n {n}")
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


async def run_open_level(server: str, url: str, rate: float, seed: int, cfg: ServeConfig, image_b64: str,
                         pid: int | None) -> Level:
    """Request i of `cfg.requests` arrives at arrival_times(rate, n, seed)[i] and is sent then, on its own
    connection if need be; those due after LEVEL_LIMIT_S are not sent (lost)."""
    level = Level(server, None, rate=rate, planned=cfg.requests)
    times = [t for t in arrival_times(rate, cfg.requests, seed) if t < LEVEL_LIMIT_S]
    level.arrived = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else None

    async def load(client, t0: float) -> None:
        async def arrive(i: int, at: float) -> None:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            level.sent += 1
            await send(client, request_body(i, cfg, image_b64), cfg, level, t0 + at)

        await asyncio.gather(*(arrive(i, at) for i, at in enumerate(times)))

    await drive(url, level, pid, cfg, max(1, len(times)), load)
    level.wall_s -= times[0] if times else 0.0  # from the first arrival
    return level


class OpenLoop:
    """The open-loop levels of every server at the same rates: given (`--rates`), or measured on the request-level
    server (`--rates auto`: its closed-loop capacity times `--loads`). Rate by rate, every server in turn
    (`run_all`), so a drift in the machine's speed during the run falls on every server alike."""

    def __init__(self, cfg: ServeConfig, image_b64: str, log=print):
        self.cfg, self.image, self.log = cfg, image_b64, log
        self.rates: tuple[float, ...] = cfg.rates
        self.loads: tuple[float | None, ...] = (None,) * len(cfg.rates)

    def capacity(self, name: str, url: str, pid: int | None) -> Level:
        """`--rates auto`: `name`'s closed-loop throughput with as many workers as fill one call; sets the rates."""
        cfg = self.cfg
        c = max(1, cfg.max_batch_rows // 2)  # simple-guidance requests that fill one call
        cap = asyncio.run(run_level(name, url, c, cfg, self.image, pid, CAPACITY_ROUNDS * c, LEVEL_LIMIT_S))
        capacity = cap.images / cap.wall_s
        if not capacity:
            raise ServeBenchError(f"--rates auto: {name} answered none of its capacity requests: {status_line(cap)}")
        self.rates = tuple(float(f"{f * capacity:.3g}") for f in cfg.loads)
        self.loads = cfg.loads
        self.log(f"{name}: capacity {capacity:.3g} images/s (closed loop, concurrency {c}, {status_line(cap)}); "
                 f"rates {', '.join(f'{r:g}' for r in self.rates)} requests/s "
                 f"({', '.join(f'{f:g}x' for f in cfg.loads)})")
        return cap

    def level(self, k: int, name: str, url: str, pid: int | None) -> Level:
        """`name` at the k-th rate: the k-th seeded arrival times (the same for every server)."""
        cfg, rate = self.cfg, self.rates[k]
        lv = asyncio.run(run_open_level(name, url, rate, cfg.seed + k, cfg, self.image, pid))
        lv.load = self.loads[k]
        if lv.sent < cfg.requests:
            self.log(f"{name}: rate {rate:g}/s: {lv.sent} of {cfg.requests} arrived within {LEVEL_LIMIT_S:.0f} s")
        self.log(f"{name}: rate {rate:g}/s: {lv.images / lv.wall_s:.3g} images/s, {status_line(lv)}")
        return lv

    def run_all(self, servers: dict) -> list[Level]:
        """servers: name -> (url, pid), all up. The capacity first (`--rates auto`: on `engine`, else the first),
        then each rate on each server in turn."""
        out = []
        if not self.rates:
            first = "engine" if "engine" in servers else next(iter(servers))
            out.append(self.capacity(first, *servers[first]))
        for k in range(len(self.rates)):
            for name, (url, pid) in servers.items():
                out.append(self.level(k, name, url, pid))
        return out
