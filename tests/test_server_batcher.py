"""The batcher alone (no HTTP, no model): grouping by key, row budget, oldest first, deadlines, queue bound,
a failing batch retried one request at a time, drain."""
import asyncio
import threading
import time

import pytest

from ipadapter_instruct.engine.server.batcher import Batcher, DeadlineExceeded, Draining, Job, QueueFull


class Recorder:
    """A runner that records each call's payloads; payloads starting with "boom" raise; `gate` holds calls."""

    def __init__(self, delay=0.0):
        self.calls, self.delay, self.gate = [], delay, threading.Event()
        self.gate.set()

    def __call__(self, jobs, progress):
        self.gate.wait(10)
        names = [j.payload for j in jobs]
        self.calls.append(names)
        time.sleep(self.delay)
        if any(n.startswith("boom") for n in names):
            raise RuntimeError("bad request in batch")
        progress(1, 1)
        return [n.upper() for n in names]


def job(payload, key="a", rows=2, timeout=30.0, progress=None):
    return Job(payload, key, rows, time.monotonic() + timeout, progress)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_compatible_requests_share_a_call_up_to_the_row_budget():
    async def main():
        rec = Recorder()
        b = Batcher(rec, max_batch_rows=4, max_wait_ms=50)
        b.start()
        futs = [b.submit(job(f"r{i}")) for i in range(5)]  # 2 rows each: at most two per call
        out = await asyncio.gather(*futs)
        await b.stop()
        return rec.calls, out

    calls, out = run(main())
    assert out == ["R0", "R1", "R2", "R3", "R4"]
    assert calls == [["r0", "r1"], ["r2", "r3"], ["r4"]]


def test_other_keys_wait_and_the_oldest_is_always_served_first():
    async def main():
        rec = Recorder()
        rec.gate.clear()  # hold the worker so everything below queues behind the first call
        b = Batcher(rec, max_batch_rows=8, max_wait_ms=0)
        b.start()
        first = b.submit(job("a0"))
        await asyncio.sleep(0.05)
        futs = [b.submit(job(p, key=p[0])) for p in ("b1", "a2", "b3", "a4", "c5", "a6")]
        rec.gate.set()
        await asyncio.gather(first, *futs)
        await b.stop()
        return rec.calls

    calls = run(main())
    # after a0: the oldest waiting is b1, so b's go next even though more a's are waiting
    assert calls == [["a0"], ["b1", "b3"], ["a2", "a4", "a6"], ["c5"]]


def test_max_wait_gathers_requests_that_arrive_shortly_after():
    async def main():
        rec = Recorder()
        b = Batcher(rec, max_batch_rows=16, max_wait_ms=300)
        b.start()
        f1 = b.submit(job("x1"))
        await asyncio.sleep(0.05)
        f2 = b.submit(job("x2"))
        await asyncio.gather(f1, f2)
        await b.stop()
        return rec.calls

    assert run(main()) == [["x1", "x2"]]


def test_a_failing_batch_is_retried_alone_so_only_the_bad_request_fails():
    async def main():
        rec = Recorder()
        b = Batcher(rec, max_batch_rows=8, max_wait_ms=50)
        b.start()
        futs = [b.submit(job(p)) for p in ("ok1", "boom", "ok2")]
        out = await asyncio.gather(*futs, return_exceptions=True)
        after = await b.submit(job("next"))
        await b.stop()
        return rec.calls, out, after

    calls, out, after = run(main())
    assert calls[0] == ["ok1", "boom", "ok2"] and calls[1:4] == [["ok1"], ["boom"], ["ok2"]]
    assert out[0] == "OK1" and out[2] == "OK2" and isinstance(out[1], RuntimeError)
    assert after == "NEXT"


def test_queue_bound_deadline_and_withdraw():
    async def main():
        rec = Recorder()
        rec.gate.clear()
        b = Batcher(rec, max_batch_rows=2, max_wait_ms=0, max_queue=2)
        b.start()
        running = b.submit(job("run"))
        await asyncio.sleep(0.05)  # "run" is on the worker now
        late = b.submit(job("late", timeout=0.05))
        gone = job("gone")
        b.submit(gone)
        with pytest.raises(QueueFull):
            b.submit(job("overflow"))
        assert b.withdraw(gone) and not b.withdraw(gone)
        await asyncio.sleep(0.1)  # past late's deadline while it waits
        rec.gate.set()
        await running
        with pytest.raises(DeadlineExceeded):
            await late
        await b.stop()
        return rec.calls

    assert run(main()) == [["run"]]  # neither the expired nor the withdrawn request reached the runner


def test_progress_reaches_every_request_of_the_call():
    seen = []

    async def main():
        b = Batcher(Recorder(), max_batch_rows=8, max_wait_ms=50)
        b.start()
        futs = [b.submit(job(p, progress=lambda s, t, p=p: seen.append((p, s, t)))) for p in ("p", "q")]
        await asyncio.gather(*futs)
        await b.stop()

    run(main())
    assert sorted(seen) == [("p", 1, 1), ("q", 1, 1)]


def test_drain_finishes_queued_and_running_then_refuses():
    async def main():
        rec = Recorder(delay=0.05)
        b = Batcher(rec, max_batch_rows=2, max_wait_ms=0)
        b.start()
        futs = [b.submit(job(f"d{i}")) for i in range(3)]
        await b.drain()
        assert all(f.done() for f in futs)
        with pytest.raises(Draining):
            b.submit(job("after"))
        await b.stop()
        return [f.result() for f in futs]

    assert run(main()) == ["D0", "D1", "D2"]
