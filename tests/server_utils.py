"""Real `python -m engine serve` processes for tests: started on a free 127.0.0.1 port, ready when /ready says so."""
from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import threading
import time

import httpx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ServerProcess:
    def __init__(self, args: list[str], env: dict | None = None, timeout: float = 120.0):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--port", "0", *args], cwd=REPO,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.url: str | None = None
        self._seen = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        with self._seen:
            while not any(line.startswith("ready:") for line in self.lines):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.proc.kill()
                    raise RuntimeError("server did not become ready:\n" + "".join(self.lines))
                self._seen.wait(0.2)

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._seen:
                self.lines.append(line)
                if line.startswith("listening on "):
                    self.url = line.split()[2]
                self._seen.notify_all()

    def output(self) -> str:
        with self._seen:
            return "".join(self.lines)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def tiny_args(tiny: dict) -> list[str]:
    return ["--model", tiny["model"], "--image-encoder", tiny["image_encoder"], "--adapter", tiny["adapter"]]


def png_base64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode_png(text: str):
    from PIL import Image
    return Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB")


def metric(url: str, name: str, labels: str = "") -> float:
    """One sample of /metrics, e.g. metric(url, "engine_batch_requests_sum")."""
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + labels + " "):
            return float(line.split()[-1])
    return 0.0


class InProcessServer:
    """The app on its own event loop thread, driven through httpx's ASGI transport (lifespan run by hand)."""

    def __init__(self, config, pipe):
        import asyncio

        from ipadapter_instruct.engine.server.app import create_app

        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.app = create_app(config, pipe)
        self.state = self.app.state.engine
        self._lifespan = self.app.router.lifespan_context(self.app)
        self.call(self._lifespan.__aenter__())
        transport = httpx.ASGITransport(app=self.app)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1",  # a Host the app answers
                                         timeout=120)
        deadline = time.monotonic() + 120
        while self.request("GET", "/ready").status_code != 200:
            if self.state.failed or time.monotonic() > deadline:
                raise RuntimeError(f"app did not become ready: {self.state.failed}")
            time.sleep(0.05)

    def call(self, coro, timeout=300):
        import asyncio
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def request(self, method, path, **kwargs) -> httpx.Response:
        return self.call(self.client.request(method, path, **kwargs))

    def concurrently(self, *requests) -> list[httpx.Response]:
        """requests: (method, path, kwargs) sent at once; answers in the same order."""
        import asyncio

        async def go():
            return await asyncio.gather(*(self.client.request(m, p, **kw) for m, p, kw in requests))
        return self.call(go())

    def close(self) -> None:
        self.call(self.client.aclose())
        self.call(self._lifespan.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        pipe = getattr(self.state, "pipe", None)
        if pipe is not None and hasattr(pipe, "set_encoder_cache"):
            pipe.set_encoder_cache(None)  # a test's pipeline may be shared: the next test starts uncached
