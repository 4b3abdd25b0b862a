"""Dynamic batching (knows nothing of HTTP): requests that arrive within `max_wait_ms` of the oldest waiting one
and can share a call (same group key: size, steps, scheduler, images per request) run as one call, counted in
UNet rows up to `max_batch_rows`. The oldest waiting request is always in the next batch, so none starves
behind a stream of compatible ones. Calls run one at a time on one worker thread; the event loop only waits.

A call that raises is retried one request at a time, so one bad request fails alone."""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)


def worker_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-worker")


class QueueFull(Exception):
    """The queue holds `max_queue` requests already."""


class Draining(Exception):
    """The server is shutting down (or not ready) and takes no new requests."""


class DeadlineExceeded(Exception):
    """The request's deadline passed while it waited; it never reached the model."""


@dataclass(eq=False)
class Job:
    """One request. `payload` is whatever the runner takes; the batcher reads only key, rows and the clocks."""
    payload: Any
    key: tuple            # requests with equal keys may share a call
    rows: int             # UNet rows this request adds to a call
    deadline: float       # time.monotonic() after which it is dropped if still queued
    progress: Callable[[int, int], None] | None = None   # (step, total) from the worker thread
    id: int = field(default_factory=itertools.count().__next__)
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None
    future: asyncio.Future | None = None
    cancelled: bool = False
    batch_requests: int = 0   # the call it ran in (1 when it was retried alone)
    batch_rows: int = 0


class Batcher:
    """`run(jobs, progress) -> [value per job]` runs on the worker thread. `observer`, when given, gets
    `queue_depth(n)`, `batch(jobs, seconds, ok)` and `waited(seconds)` calls (metrics)."""

    def __init__(self, run: Callable, max_batch_rows: int = 16, max_wait_ms: float = 10.0, max_queue: int = 64,
                 observer=None, executor: ThreadPoolExecutor | None = None):
        if max_batch_rows < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_rows and max_queue must be positive and max_wait_ms not negative")
        self.run, self.observer = run, observer
        self.max_batch_rows, self.max_wait_s, self.max_queue = max_batch_rows, max_wait_ms / 1e3, max_queue
        self.queue: list[Job] = []
        self.running: list[Job] = []
        self.draining = False
        # the one thread that runs the model; pass the one that loaded it: torch's OpenMP keeps a thread team per
        # thread that ran a parallel op, and two live teams on a few cores halved every call's speed (measured)
        self._executor = executor or worker_thread()
        self._free_since = 0.0  # when the worker last finished a call
        # for Retry-After: the running call's start and (step, total) from its progress, the recent calls' seconds
        self._call_t0: float | None = None
        self._call_progress: tuple[int, int] | None = None
        self.call_s: float | None = None
        self._changed: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    # ---- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._changed, self._idle = asyncio.Event(), asyncio.Event()
        self._idle.set()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="engine-batcher")

    async def drain(self) -> None:
        """Take no new requests; return once every queued and running one has finished."""
        self.draining = True
        while self.queue or self.running:
            self._idle.clear()
            self._changed.set()
            await self._idle.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for job in self.queue:
            if not job.future.done():
                job.future.set_exception(Draining("the server stopped before this request ran"))
        self.queue.clear()
        self._executor.shutdown(wait=True)

    # ---- requests -------------------------------------------------------------------------------------

    def submit(self, job: Job) -> asyncio.Future:
        """Queue `job`; its future resolves to the runner's value. Raises Draining or QueueFull at once."""
        if self.draining or self._task is None:
            raise Draining("the server is not taking requests (starting or shutting down)")
        if len(self.queue) >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
        job.future = asyncio.get_running_loop().create_future()
        self.queue.append(job)
        self._depth()
        self._changed.set()
        return job.future

    def withdraw(self, job: Job) -> bool:
        """Remove a job that is still queued (client gone, deadline passed). False once it runs or ran."""
        if job in self.queue:
            self.queue.remove(job)
            job.cancelled = True
            self._depth()
            self._changed.set()
            return True
        return False

    def retry_after_s(self) -> int:
        """Retry-After for a 429 or a draining 503: the queue's expected wait in whole seconds, 1 to 3600."""
        return max(1, min(3600, math.ceil(self.expected_wait_s())))

    def expected_wait_s(self) -> float:
        """Seconds until the work running and queued now is done: the running call's rest, projected from its
        progress (step k of n after t seconds: t (n - k) / k), then one call per --max-batch-rows queued rows at the
        recent calls' seconds (or the running call's projected length before any call has finished)."""
        per_call, left = self.call_s, 0.0
        t0, progress = self._call_t0, self._call_progress
        if self.running and t0 is not None:
            elapsed = time.monotonic() - t0
            if progress is not None and progress[0] > 0:
                whole = elapsed * progress[1] / progress[0]
                left, per_call = whole - elapsed, per_call or whole
            else:
                left = max(0.0, (per_call or 0.0) - elapsed)
        calls = math.ceil(sum(j.rows for j in self.queue) / self.max_batch_rows)
        return left + calls * (per_call or 0.0)

    # ---- the loop ---------------------------------------------------------------------------------------

    def _depth(self) -> None:
        if self.observer is not None:
            self.observer.queue_depth(len(self.queue))

    def _expire(self) -> None:
        now = time.monotonic()
        for job in [j for j in self.queue if j.deadline <= now]:
            self.queue.remove(job)
            if not job.future.done():
                job.future.set_exception(DeadlineExceeded("the request timed out while queued"))
        self._depth()

    def select(self) -> list[Job]:
        """The oldest job, then younger ones with its key in arrival order while their rows fit."""
        head = self.queue[0]
        batch, rows = [head], head.rows
        for job in self.queue[1:]:
            if job.key == head.key and rows + job.rows <= self.max_batch_rows:
                batch.append(job)
                rows += job.rows
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._expire()
            if not self.queue:
                self._idle.set()
                self._changed.clear()
                await self._changed.wait()
                continue
            batch = self.select()
            # wait from the later of the head's arrival and the worker freeing up: requests that queued during the
            # last call would otherwise leave at once, before the clients just answered send their next request
            wait = max(self.queue[0].enqueued, self._free_since) + self.max_wait_s - time.monotonic()
            full = sum(j.rows for j in batch) >= self.max_batch_rows or len(self.queue) >= self.max_queue
            if wait > 0 and not full and not self.draining:
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                continue
            for job in batch:
                self.queue.remove(job)
                job.started = time.monotonic()
                if self.observer is not None:
                    self.observer.waited(job.started - job.enqueued)
            self._depth()
            self.running = batch
            try:
                results = await loop.run_in_executor(self._executor, self._call, batch)
            finally:
                self.running = []
                self._free_since = time.monotonic()
            for job, outcome in zip(batch, results):
                if job.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)

    def _call(self, batch: list[Job]) -> list:
        # on the worker thread: the whole batch, or each job alone when the batch fails
        def progress(step, total):
            self._call_progress = (step, total)
            for job in batch:
                if job.progress is not None:
                    job.progress(step, total)

        for job in batch:
            job.batch_requests, job.batch_rows = len(batch), sum(j.rows for j in batch)
        t0 = time.perf_counter()
        self._call_t0, self._call_progress = time.monotonic(), None
        try:
            values = self.run(batch, progress)
            seconds = time.perf_counter() - t0
            self.call_s = seconds if self.call_s is None else 0.7 * self.call_s + 0.3 * seconds
            if self.observer is not None:
                self.observer.batch(batch, seconds, True)
            return values
        except Exception as e:
            if self.observer is not None:
                self.observer.batch(batch, time.perf_counter() - t0, False)
            if len(batch) == 1:
                return [e]
            log.warning("a batch of %d requests failed (%s: %s); running them one at a time", len(batch),
                        type(e).__name__, e)
            return [self._call([job])[0] for job in batch]
