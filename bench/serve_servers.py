"""The servers `python -m bench serve` measures, each a subprocess on a free 127.0.0.1 port: its command line
(`server_argv`), its start up to its `ready: URL` line, and its stop (SIGTERM)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque

from ipadapter_instruct.bench.serve_config import ServeBenchError, ServeConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_S = 600.0  # process start to `ready:`


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
        return [*py, "ipadapter_instruct.bench.serve_baseline", "--model", paths["model"], "--image-encoder", paths["image_encoder"],
                "--plus-adapter", paths["plus_adapter"], "--port", "0"]
    rows = 2 if name == "engine-single" else cfg.max_batch_rows
    return [*py, "engine", "serve", "--model", paths["model"], "--image-encoder", paths["image_encoder"],
            "--adapter", paths["adapter"], "--port", "0", "--max-batch-rows", str(rows),
            "--max-wait-ms", str(cfg.max_wait_ms), *(["--batching", "step"] if name == "engine-step" else []),
            *(["--cuda-graphs"] if cfg.cuda_graphs else [])]


def stop_server(name: str, server: ServerProcess, log) -> None:
    rc = server.stop()
    if rc != 0 and server.url:  # (one that never got ready said why already)
        log(f"{name}: exited with code {rc} after SIGTERM (expected 0)")
