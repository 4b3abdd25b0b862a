"""What one app instance holds: the loaded pipeline, its runner, the batcher, the conditioning cache and the metrics,
built in one place (`ServerState._load`, on the worker thread) and handed to the routes through `app.state.engine`.
"""
from __future__ import annotations

import asyncio
import logging
import time

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.registry import apply_fast_path, load_pipeline
from ipadapter_instruct.engine.selfcheck import summary
from ipadapter_instruct.engine.server.batcher import Batcher, Job, worker_thread
from ipadapter_instruct.engine.server.cache import ConditioningCache
from ipadapter_instruct.engine.server.config import ServerConfig
from ipadapter_instruct.engine.server.metrics import Metrics
from ipadapter_instruct.engine.server.stepper import StepBatcher
from ipadapter_instruct.engine.server.uploads import PixelBudget
from ipadapter_instruct.engine.server.runners import EditRunner, PipelineRunner

log = logging.getLogger("ipadapter_instruct.engine.server")
TASKS = {"sd15": "text-to-image", "sdxl": "SDXL text-to-image", "edit": "InstructPix2Pix edit"}  # pipe.kind's


def task_name(kind: str) -> str:
    """The ready line's words for a model kind (engine/registry.py's KINDS)."""
    return TASKS.get(kind, kind)


class ServerState:
    """Everything one app instance holds; `start()` loads and warms up, `drain()` finishes and refuses."""

    def __init__(self, config: ServerConfig, pipe=None):
        self.config, self.pipe = config, pipe
        self.metrics = Metrics()
        self.decode_budget = PixelBudget(config.max_decode_pixels, self.metrics.decode_pixels.set)
        self.api_key = config.api_key()
        self.runner = self.batcher = self.cache = None
        self.ready = self.draining = False
        self.failed: str | None = None
        self.t_created = time.monotonic() - process_age_s()
        self.ready_s: float | None = None
        self.url: str | None = None   # set by whoever binds the socket, for the ready line
        self.worker = worker_thread()  # loads, warms up and runs the model: torch on one thread only
        self.on_failure = None         # called when loading fails (the standalone server then exits 1)

    async def start(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self.worker, self._load)
        except Exception as e:  # the process stays up and says why on /ready and in the log
            self.failed = str(e) if isinstance(e, EngineError) else f"{type(e).__name__}: {e}"
            if self.on_failure is not None:  # the standalone server stops and prints it as its one error line
                self.on_failure()
            else:
                log.error("could not load the model: %s", self.failed)
            return
        if self.draining:  # SIGTERM came while loading: never turn ready
            return
        self.batcher = self._batcher()
        self.batcher.start()
        self.ready_s = time.monotonic() - self.t_created
        self.ready = True
        self.metrics.ready.set(1)
        p, c = self.pipe, self.config
        adapter = f", {self.runner.kind} adapter" if self.runner.kind else ""
        print(f"ready: {self.url or 'app'} ({task_name(p.kind)}{adapter}, {p.device}, "
              f"{str(p.dtype).replace('torch.', '')}, {p.attention_backend} attention, {c.batching}-level batching; "
              f"{self.ready_s:.1f} s "
              f"after the process started)", flush=True)

    def _batcher(self):
        c = self.config
        if c.batching == "step":
            return StepBatcher(self.runner, c.max_batch_rows, c.max_queue, observer=self.metrics,
                               executor=self.worker)
        return Batcher(self.run, c.max_batch_rows, c.max_wait_ms, c.max_queue, observer=self.metrics,
                       executor=self.worker)

    def run(self, jobs: list[Job], progress) -> list[dict]:
        return self.runner([job.payload for job in jobs], progress)

    def _load(self) -> None:
        c = self.config
        if self.pipe is None:  # the registry's one loader: kind, weights, LoRAs, channels-last, compile, graphs
            self.pipe = load_pipeline(c)
        else:  # a pipeline handed in ready-made (tests, embedding): the config's fast path on it
            apply_fast_path(self.pipe, c)
        self.pipe.set_progress_bar_config(disable=True)
        self.cache = ConditioningCache(c.cache_size)
        self.cache.attach(self.pipe)
        self.runner = (EditRunner if self.pipe.kind == "edit" else PipelineRunner)(self.pipe, c.max_size, c.model)
        if c.batching == "step" and not self.pipe.capabilities.step_batching:
            raise EngineError("--batching step runs on the PyTorch backend; this server loads exported graphs: use "
                              "--batching request")
        if c.warmup:
            self._warm_up()
        self.cache.on_lookup = self.metrics.lookup  # counted from the first real request on

    def _warm_up(self) -> None:
        """One 1-step request at the native size: kernels, allocator and caches ready before /ready."""
        t0 = time.perf_counter()
        self.runner([self.runner.warmup_work()])
        print(f"warm-up: one 1-step request in {(time.perf_counter() - t0) * 1e3:.0f} ms; "
              f"{summary(self.pipe.fast_path_report())}", flush=True)

    async def drain(self) -> None:
        self.ready, self.draining = False, True
        self.metrics.ready.set(0)
        if self.batcher is not None:
            await self.batcher.drain()

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        self.worker.shutdown(wait=False)


def process_age_s() -> float:
    """Seconds since this process started (so /ready's figure counts the imports too); 0 if unknown."""
    try:
        import psutil  # optional: without it the figure counts from the app's creation
        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:
        return 0.0
