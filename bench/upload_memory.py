"""Peak memory of the server under many concurrent maximal uploads: a `serve --tiny` process (of this checkout, or
of `--repo DIR` to measure another one, e.g. the code before a change), N concurrent requests each carrying an
all-zero SIDE x SIDE PNG (49 KB at 4096, under the default --max-pixels), 1 step each; the server's resident memory
(RSS, its children included) sampled every 20 ms: before, at its peak, and after the last answer.

    python -m bench.upload_memory [--concurrency 60] [--side 4096] [--repo DIR] [--json out/bench-upload-memory.json]
    python -m bench.upload_memory -- --max-decode-pixels 16777216     # flags after -- go to `serve`

It measures memory, not speed: the timings in its rows are only there to say how long the load took.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

from ipadapter_instruct.bench.common import Row, git_sha, write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def zero_png(side: int) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


class Sampler(threading.Thread):
    """RSS of a process and its children, every `every_s` seconds, until stopped."""

    def __init__(self, pid: int, every_s: float = 0.02):
        import psutil
        super().__init__(daemon=True)
        self.proc, self.every_s, self.peak, self.stopped = psutil.Process(pid), every_s, 0, threading.Event()

    def rss(self) -> int:
        import psutil
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def run(self) -> None:
        while not self.stopped.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.every_s)


def start_server(repo: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": repo}
    proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--tiny", "--port", "0", *extra], cwd=repo,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("ready:"):
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining its output
            return proc, line.split()[1]
    raise SystemExit(f"the server in {repo} exited before it was ready (code {proc.wait()})")


async def load(url: str, image_b64: str, n: int) -> Counter:
    import httpx
    body = {"prompt": "a lighthouse", "instruct": "use the composition of this image", "image": image_b64,
            "num_inference_steps": 1}
    async with httpx.AsyncClient(timeout=600) as client:
        answers = await asyncio.gather(*(client.post(url + "/v1/generate", json=dict(body, seed=i))
                                         for i in range(n)))
    return Counter(a.status_code for a in answers)


def measure(repo: str, n: int, side: int, extra: list[str]) -> dict:
    proc, url = start_server(repo, extra)
    try:
        sampler = Sampler(proc.pid)
        time.sleep(1.0)
        before = sampler.rss()
        png = zero_png(side)
        sampler.start()
        t0 = time.perf_counter()
        statuses = asyncio.run(load(url, base64.b64encode(png).decode(), n))
        seconds = time.perf_counter() - t0
        sampler.stopped.set()
        sampler.join()
        time.sleep(1.0)
        after = sampler.rss()
        return {"before_mb": before / 2**20, "peak_mb": sampler.peak / 2**20, "after_mb": after / 2**20,
                "seconds": seconds, "statuses": dict(statuses), "png_bytes": len(png)}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m bench.upload_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=60, help="requests sent at once")
    p.add_argument("--side", type=int, default=4096, help="the all-zero PNG's width and height")
    p.add_argument("--repo", default=REPO, help="the checkout whose server is measured (default: this one)")
    p.add_argument("--json", default=os.path.join("out", "bench-upload-memory.json"), help="where the rows go")
    a = p.parse_args(own)
    if a.concurrency < 1 or a.side < 1:
        p.error("--concurrency and --side must be positive")
    r = measure(os.path.abspath(a.repo), a.concurrency, a.side, extra)
    config = {"concurrency": a.concurrency, "side": a.side, "png_bytes": r["png_bytes"], "serve_flags": extra,
              "statuses": r["statuses"], "seconds": round(r["seconds"], 2)}
    provider = "engine" + ("" if os.path.abspath(a.repo) == REPO else f" ({a.repo})")
    rows = [Row("upload_memory", provider, metric, "MB", "concurrency", a.concurrency, v, v, v,
                f"cpu ({os.cpu_count()} cores)", "float32", git_sha(), config)
            for metric, v in (("rss_before", r["before_mb"]), ("rss_peak", r["peak_mb"]), ("rss_after", r["after_mb"]))]
    write_json(rows, a.json)
    print(f"{a.concurrency} concurrent {a.side}x{a.side} all-zero PNGs ({r['png_bytes']} bytes each), statuses "
          f"{r['statuses']}, {r['seconds']:.1f} s: server RSS {r['before_mb']:.0f} MB before, {r['peak_mb']:.0f} MB "
          f"at peak, {r['after_mb']:.0f} MB after; rows in {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
