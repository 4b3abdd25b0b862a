"""Prometheus metrics of one server (its own registry, so several apps in one process do not collide)."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Also the batcher's observer (queue_depth, waited, batch) and the cache's lookup hook."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("engine_requests", "finished HTTP generation requests (every shape: native, "
                                "OpenAI, Automatic1111) by status code", ["status"], registry=r)
        self.depth = Gauge("engine_queue_depth", "requests waiting for the model", registry=r)
        self.rows = Histogram("engine_batch_rows", "UNet rows per pipeline call", buckets=ROW_BUCKETS, registry=r)
        self.batch_requests = Histogram("engine_batch_requests", "requests per pipeline call", buckets=ROW_BUCKETS,
                                        registry=r)
        self.queue_wait = Histogram("engine_queue_wait_seconds", "time from arrival to the start of its call",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.compute = Histogram("engine_compute_seconds", "wall time of one pipeline call",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("engine_images", "images generated", registry=r)
        self.images_per_s = Gauge("engine_images_per_second", "images / compute seconds of the last call", registry=r)
        self.cache = Counter("engine_cache_lookups", "conditioning cache lookups", ["kind", "result"], registry=r)
        self.decode_pixels = Gauge("engine_decode_pixels", "request image pixels being decoded now (at most "
                                   "--max-decode-pixels, or one larger image alone)", registry=r)
        self.ready = Gauge("engine_ready", "1 when weights are loaded, warmed up and not draining", registry=r)
        # --batching step
        self.step_rows = Histogram("engine_step_rows", "UNet rows per step (step-level batching)",
                                   buckets=ROW_BUCKETS, registry=r)
        self.step_requests = Histogram("engine_step_requests", "requests in flight per step (step-level batching)",
                                       buckets=ROW_BUCKETS, registry=r)
        # the fast path's first-use checks (engine/selfcheck.py), read from the pipeline when /metrics is asked
        self.fast_path_checks = Gauge("engine_fast_path_checks", "component shapes checked against their eager path, "
                                      "by result (ok: fused runs; fallback: eager runs; unverified)",
                                      ["component", "result"], registry=r)
        self.fast_path_check_seconds = Gauge("engine_fast_path_check_seconds",
                                             "what the first-use checks cost in all", registry=r)

    content_type = CONTENT_TYPE_LATEST

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # batcher observer
    def queue_depth(self, n: int) -> None:
        self.depth.set(n)

    def waited(self, seconds: float) -> None:
        # request-level: until its call starts; step-level: until it joins the running batch (its join latency)
        self.queue_wait.observe(seconds)

    def step(self, rows: int, requests: int) -> None:
        self.step_rows.observe(rows)
        self.step_requests.observe(requests)

    def batch(self, jobs, seconds: float, ok: bool) -> None:
        self.compute.observe(seconds)
        self.rows.observe(sum(j.rows for j in jobs))
        self.batch_requests.observe(len(jobs))
        if ok:
            n = sum(j.payload.req.num_images_per_prompt for j in jobs)
            self.images.inc(n)
            self.images_per_s.set(n / seconds if seconds > 0 else 0.0)

    def fast_path(self, report: dict) -> None:
        counts = {}
        for v in report["checks"]:
            counts[v["component"], v["status"]] = counts.get((v["component"], v["status"]), 0) + 1
        for (component, result), n in counts.items():
            self.fast_path_checks.labels(component, result).set(n)
        self.fast_path_check_seconds.set(report["check_ms"] / 1e3)

    # cache hook
    def lookup(self, kind: str, hit: bool) -> None:
        self.cache.labels(kind, "hit" if hit else "miss").inc()
