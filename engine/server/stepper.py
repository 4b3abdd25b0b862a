"""Step-level (continuous) batching behind the server (`serve --batching step`): a request joins the running UNet
batch at the next step instead of waiting for the whole batch to finish.

Each turn of the loop, on the one worker thread:

    admit   queued requests, oldest first, while the rows in flight stay within --max-batch-rows: their text,
            image, projector and K/V work runs now, once, as one batch for those of one step count, scheduler
            and size (Pipeline.start_many -> a flight each)
    drop    flights whose client went away (their rows are free at this step); a deadline drops a request only
            while it is queued (Batcher._expire, as in request-level batching): once admitted, it finishes
    step    every running flight one step: one UNet call per image size (Pipeline.step packs the rows; each flight
            keeps its own scheduler, timesteps, generator, guidance weights and scales)
    decode  finished flights in one VAE call, at most `decode_chunk` of them per turn while others still step (so
            finishing requests add one bounded decode to one step of the others, not a decode each to every
            step), all at once when nothing else runs

Between turns the event loop answers finished requests and queues new ones. The request-level `Batcher` stays the
default; this one shares its queue, bounds, draining and metrics observer.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time

from ipadapter_instruct.engine.server.batcher import Batcher, Job

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The client went away while its request was in flight; its rows left the batch at the next step."""


class StepBatcher(Batcher):
    mid_flight = True  # withdraw() also works on a running request: it leaves at the next step

    def __init__(self, runner, max_batch_rows: int = 16, max_queue: int = 64, observer=None, executor=None,
                 decode_chunk: int = 4):
        super().__init__(runner, max_batch_rows, 0.0, max_queue, observer=observer, executor=executor)
        self.runner = runner
        self.decode_chunk = decode_chunk
        self.packers: dict = {}   # image size -> engine.stepping.Packer (the packed inputs of that size's set)

    def withdraw(self, job: Job) -> bool:
        if super().withdraw(job):
            return True
        if job in self.running and not job.cancelled and not job.future.done():
            job.cancelled = True
            self._changed.set()
            return True
        return False

    def expected_wait_s(self) -> float:
        """Retry-After's estimate in turns: the longest running flight's steps left, then as many more of the
        running flights' mean length per --max-batch-rows queued rows, at the recent seconds per turn."""
        flights = [f for f in (getattr(j, "flight", None) for j in self.running) if f is not None]
        left = max((f.total - f.index for f in flights), default=0)
        mean = sum(f.total for f in flights) / len(flights) if flights else 0
        turns = left + math.ceil(sum(j.rows for j in self.queue) / self.max_batch_rows) * mean
        return turns * (self.call_s or 0.0)

    def admit(self) -> list[Job]:
        """Queued jobs, oldest first (none overtakes an older one), while the rows in flight fit the bound; a job
        larger than the bound on its own runs when nothing else does."""
        rows = sum(j.rows for j in self.running)
        out = []
        for job in list(self.queue):
            if out or self.running:
                if rows + job.rows > self.max_batch_rows:
                    break
            self.queue.remove(job)
            job.started = time.monotonic()
            if self.observer is not None:
                self.observer.waited(job.started - job.enqueued)
            out.append(job)
            rows += job.rows
        return out

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._expire()
            if not self.queue and not self.running:
                self._idle.set()
                self._changed.clear()
                await self._changed.wait()
                continue
            admitted = self.admit()
            self.running.extend(admitted)
            self._depth()
            t0 = time.monotonic()
            outcomes = await loop.run_in_executor(self._executor, self._turn, admitted, list(self.running))
            self._free_since = time.monotonic()
            turn = self._free_since - t0
            self.call_s = turn if self.call_s is None else 0.7 * self.call_s + 0.3 * turn  # here: seconds per turn
            for job, value in outcomes:
                if job in self.running:
                    self.running.remove(job)
                if job.future.done():
                    continue
                if isinstance(value, BaseException):
                    job.future.set_exception(value)
                else:
                    job.future.set_result(value)

    # ---- on the worker thread ----------------------------------------------------------------------------

    def _turn(self, admitted: list[Job], running: list[Job]) -> list[tuple[Job, object]]:
        outcomes = self._admit(admitted)
        live = []
        for job in running:
            flight = getattr(job, "flight", None)
            if flight is None:
                continue
            if job.cancelled:
                outcomes.append((job, Cancelled("the client went away; the request left the batch")))
            else:
                live.append(job)
        stepping = [j for j in live if not j.flight.done]
        groups: dict = {}
        for job in stepping:
            groups.setdefault(job.flight.size, []).append(job)
        for size, jobs in groups.items():
            outcomes.extend(self._step(size, jobs))
        failed = {id(j) for j, _ in outcomes}
        finished = [j for j in live if j.flight.done and id(j) not in failed]
        still = any(not j.flight.done for j in live if id(j) not in failed)
        outcomes.extend(self._finish(finished[:self.decode_chunk] if still else finished))
        return outcomes

    def _admit(self, admitted: list[Job]) -> list[tuple[Job, object]]:
        """Flights for the admitted jobs: one batched admission per key; a failed batch is retried one by one, so
        a bad request fails alone."""
        groups: dict = {}
        for job in admitted:
            job.flight = None
            groups.setdefault(job.key, []).append(job)
        outcomes = []
        for jobs in groups.values():
            if len(jobs) > 1:
                try:
                    flights = self.runner.start_many([j.payload for j in jobs], [j.progress for j in jobs])
                    now = time.perf_counter()
                    for job, flight in zip(jobs, flights):
                        job.flight, job.t_compute = flight, now
                    continue
                except Exception as e:
                    log.warning("admitting %d requests together failed (%s: %s); admitting them one at a time",
                                len(jobs), type(e).__name__, e)
            for job in jobs:
                try:
                    job.flight = self.runner.start(job.payload, job.progress)
                    job.t_compute = time.perf_counter()
                except Exception as e:
                    outcomes.append((job, e))
        return outcomes

    def _step(self, size, jobs: list[Job]) -> list[tuple[Job, object]]:
        from ipadapter_instruct.engine.stepping import Packer

        packer = self.packers.setdefault(size, Packer())
        rows = sum(j.flight.rows for j in jobs)
        for job in jobs:
            job.batch_requests = max(job.batch_requests, len(jobs))
            job.batch_rows = max(job.batch_rows, rows)
        try:
            self.runner.step([j.flight for j in jobs], packer)
            if self.observer is not None and hasattr(self.observer, "step"):
                self.observer.step(rows, len(jobs))
            return []
        except Exception as e:
            if len(jobs) == 1:
                return [(jobs[0], e)]
            log.warning("a step of %d requests failed (%s: %s); stepping them one at a time", len(jobs),
                        type(e).__name__, e)
            out = []
            for job in jobs:  # each alone, with its own packed inputs (the shared ones may be the culprit)
                try:
                    self.runner.step([job.flight], Packer())
                except Exception as one:
                    out.append((job, one))
            return out

    def _finish(self, jobs: list[Job]) -> list[tuple[Job, object]]:
        """Finished jobs' answers from one batched decode; if it fails, each is decoded alone (a failure is its own)."""
        if not jobs:
            return []
        t0 = time.perf_counter()
        try:
            values = self.runner.finish_many([j.payload for j in jobs], [j.flight for j in jobs])
        except Exception as e:
            if len(jobs) == 1:
                if self.observer is not None:
                    self.observer.batch(jobs, time.perf_counter() - t0, False)
                return [(jobs[0], e)]
            return [out for job in jobs for out in self._finish([job])]
        if self.observer is not None:
            for job in jobs:
                self.observer.batch([job], time.perf_counter() - job.t_compute, True)
        return list(zip(jobs, values))
