"""`python -m bench serve --hostile F`: can a request's numbers reach another request's image? (docs/server.md,
"Isolation between requests").

Per engine server: first every good request alone, one at a time (the baseline images, by seed); then the same
good requests again with hostile ones among them, F of all requests sent, at the highest --concurrency, so they
share batches. Hostile requests cycle through HOSTILE: values out of their range (NaN, Infinity, 1e308, inside
per-block dicts too), which must be refused with a 422, and in-range extremes, which run (200) or fail alone (422
when their own latents go non-finite). Reported per server: good images that changed against their baseline (more
than one grey level: batch shapes differ), the largest difference, good requests that did not end in 200, and the
hostile requests by outcome. Any change, or an out-of-range value that was not refused, is a broken isolation.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import math

from ipadapter_instruct.bench.common import Row
from ipadapter_instruct.bench.serve_config import ServeBenchError, condition_image_b64, request_body
from ipadapter_instruct.bench.serve_report import server_env
from ipadapter_instruct.bench.serve_servers import ServerProcess, server_argv, stop_server

NAN, INF = float("nan"), float("inf")
# (name, fields, refused): refused = out of range, a 422 naming the field is the only right answer; the kinds
# alternate, so a few hostile requests already include both
HOSTILE = [
    ("guidance_scale=1e308", {"guidance_scale": 1e308}, True),
    ("guidance_scale=50", {"guidance_scale": 50.0}, False),
    ("scale={mid: NaN}", {"scale": {"mid": NAN}}, True),
    ("scale=-10", {"scale": -10.0}, False),
    ("scale=1e308", {"scale": 1e308}, True),
    ("scale={mid: 10}", {"scale": {"mid": 10.0}}, False),
    ("instruct_guidance_scale=-Infinity", {"guidance_mode": "full", "instruct_guidance_scale": -INF}, True),
    ("full guidance at 50", {"guidance_mode": "full", "guidance_scale": 50.0, "instruct_guidance_scale": 50.0,
                             "image_guidance_scale": 50.0}, False),
    ("image_guidance_scale=NaN", {"guidance_mode": "full", "image_guidance_scale": NAN}, True),
]
OUTCOMES = ("refused", "out_of_range_answered", "in_range_200", "in_range_422", "other")


def hostile_count(good: int, share: float) -> int:
    """Hostile requests so that they are `share` of all sent (at least one)."""
    return max(1, round(good * share / (1.0 - share)))


def schedule(good: int, hostile: int) -> list[tuple[str, int]]:
    """("good", i) and ("hostile", j) spread evenly: hostile j goes after good request (j + 1) * good / (hostile + 1)."""
    out, placed = [], 0
    for i in range(good):
        out.append(("good", i))
        while placed < hostile and (placed + 1) * good / (hostile + 1) <= i + 1:
            out.append(("hostile", placed))
            placed += 1
    return out + [("hostile", j) for j in range(placed, hostile)]


def pixels(b64: str):
    import numpy as np
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=int)


async def post(client, body: dict, timeout_s: float):
    # NaN and Infinity written as Python's json writes them (the server reads, then refuses them)
    return await asyncio.wait_for(client.post("/v1/generate", content=json.dumps(body),
                                              headers={"content-type": "application/json"}), timeout_s)


async def hostile_run(client, good_bodies: list[dict], share: float, concurrency: int, timeout_s: float) -> dict:
    """The baseline pass and the mixed pass on one server (an httpx.AsyncClient) -> the counts of the report."""
    baseline = {}
    for i, body in enumerate(good_bodies):
        r = await post(client, body, timeout_s)
        if r.status_code != 200:
            raise RuntimeError(f"good request {i} alone answered {r.status_code}: {r.text[:200]}")
        baseline[i] = pixels(r.json()["images"][0])
    hostile = hostile_count(len(good_bodies), share)
    work = schedule(len(good_bodies), hostile)
    res = dict(good=len(good_bodies), hostile=hostile, changed=0, max_diff=0, good_failed=0, batch_requests=0,
               **dict.fromkeys(OUTCOMES, 0))

    async def one(kind: str, i: int) -> None:
        if kind == "good":
            r = await post(client, good_bodies[i], timeout_s)
            if r.status_code != 200:
                res["good_failed"] += 1
                return
            diff = int(abs(pixels(r.json()["images"][0]) - baseline[i]).max())
            res["max_diff"] = max(res["max_diff"], diff)
            res["changed"] += diff > 1
            res["batch_requests"] = max(res["batch_requests"], r.json()["timings"]["batch_requests"])
            return
        _, fields, refused = HOSTILE[i % len(HOSTILE)]
        r = await post(client, {**good_bodies[i % len(good_bodies)], "seed": 10_000 + i, **fields}, timeout_s)
        key = ("refused" if r.status_code == 422 else "out_of_range_answered") if refused else \
            {200: "in_range_200", 422: "in_range_422"}.get(r.status_code, "other")
        res[key] += 1

    queue = list(work)

    async def worker() -> None:
        while queue:
            await one(*queue.pop(0))
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return res


def broken(res: dict) -> bool:
    return bool(res["changed"] or res["good_failed"] or res["out_of_range_answered"])


def hostile_rows(server: str, share: float, res: dict, env: dict, config: dict) -> list[Row]:
    units = {"max_diff": "grey levels"}
    return [Row("serve", server, f"hostile:{k}", units.get(k, "requests"), "hostile_share", share, float(v),
                float(v), float(v), env["device"], env["dtype"], env["git_sha"], config)
            for k, v in res.items()]


def hostile_line(server: str, res: dict) -> str:
    verdict = "BROKEN" if broken(res) else "held"
    return (f"{server}: isolation {verdict}: {res['changed']} of {res['good']} good images changed (max diff "
            f"{res['max_diff']} grey levels, batches of up to {res['batch_requests']} requests), {res['good_failed']} "
            f"good requests failed; {res['hostile']} hostile: {res['refused']} out-of-range refused, "
            f"{res['out_of_range_answered']} out-of-range answered, {res['in_range_200']} in-range 200, "
            f"{res['in_range_422']} in-range failed alone, {res['other']} other")


def run_hostile(cfg, paths: dict | None, log=print) -> tuple[list[Row], str]:
    """Each engine server of cfg.servers (or the one at --url), started, measured, stopped -> rows and the text."""
    import httpx  # deferred: the optional serve extra

    image = condition_image_b64(cfg.preset)
    goods = [request_body(i, cfg, image) for i in range(cfg.requests)]
    names = ("url",) if cfg.url else tuple(s for s in cfg.servers if s != "diffusers")
    env, config = server_env(), dict(preset=cfg.preset, steps=cfg.steps, requests=cfg.requests,
                               concurrency=max(cfg.concurrency))
    rows, lines = [], []
    for name in names:
        server = None if cfg.url else ServerProcess(name, server_argv(name, paths, cfg))
        try:
            url = cfg.url or server.wait_ready()

            async def go():
                async with httpx.AsyncClient(base_url=url, timeout=cfg.timeout_s, trust_env=False) as client:
                    return await hostile_run(client, goods, cfg.hostile, max(cfg.concurrency), cfg.timeout_s)
            res = asyncio.run(go())
        except (httpx.TransportError, RuntimeError, asyncio.TimeoutError) as e:
            raise ServeBenchError(f"server {name}: {type(e).__name__}: {e}") from None
        finally:
            if server is not None:
                stop_server(name, server, log)
        lines.append(hostile_line(name, res))
        log(lines[-1])
        rows += hostile_rows(name, cfg.hostile, res, env, config)
    return rows, "\n".join(lines)


def valid_share(share: float) -> bool:
    return math.isfinite(share) and 0.0 < share < 1.0
