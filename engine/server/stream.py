"""Server-sent events for `stream: true` or `Accept: text/event-stream`: `queued`, then `progress` per step, then
`result` or `error`."""
from __future__ import annotations

import asyncio
import json
import time

from starlette.concurrency import run_in_threadpool

from ipadapter_instruct.engine.server.batcher import Job
from ipadapter_instruct.engine.server.errors import ApiError, error_body
from ipadapter_instruct.engine.server.responses import outcome, response_body


def progress_to(events: asyncio.Queue, loop):
    def progress(step: int, total: int) -> None:  # called on the worker thread
        loop.call_soon_threadsafe(events.put_nowait, ("progress", {"step": step, "total": total}))
    return progress


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def stream_events(batcher, job: Job, events: asyncio.Queue, rid: str):
    try:
        yield sse("queued", {"request_id": rid, "queue_depth": len(batcher.queue)})
        while not job.future.done():
            getter = asyncio.ensure_future(events.get())
            timeout = max(0.0, job.deadline - time.monotonic()) if job.started is None else None
            done, _ = await asyncio.wait({getter, job.future}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield sse(*getter.result())
            else:
                getter.cancel()
                if not done and batcher.withdraw(job):
                    raise ApiError(504, "deadline_exceeded", "still queued after --request-timeout-s; dropped")
        while not events.empty():
            yield sse(*events.get_nowait())
        result = outcome(job, rid)
        yield sse("result", await run_in_threadpool(response_body, job, result, rid))
    except ApiError as e:
        yield sse("error", error_body(e.code, e.message, rid, e.field) | {"status": e.status})
    finally:  # the client went away (the generator is closed): a queued job leaves the queue
        batcher.withdraw(job)
