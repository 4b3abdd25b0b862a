"""A request's images decoded under one server-wide budget of pixels (`--max-decode-pixels`): an image's decode
waits until its pixels fit beside those being decoded now, first come first served, so N concurrent maximal
uploads hold at most the budget in decoded pixels (plus one image larger than the budget, alone). A request's images
decode one after another, and a request that waits past its deadline is dropped before compute (504)."""
from __future__ import annotations

import asyncio
import time
from collections import deque

from starlette.concurrency import run_in_threadpool

from ipadapter_instruct.engine.server.errors import ApiError
from ipadapter_instruct.engine.server.images import ImageRejected, Use, load, open_image


class PixelBudget:
    """Pixels decoded at once, bounded by `limit`; all calls on the event loop. `held` is what is decoding now,
    `peak` the most held at once; `on_change(held)` is told each change (a metrics gauge)."""

    def __init__(self, limit: int, on_change=None):
        if limit < 1:
            raise ValueError(f"the decode budget must be at least 1 pixel, got {limit}")
        self.limit, self.on_change = limit, on_change
        self.held = self.peak = 0
        self._waiters: deque = deque()   # (pixels, future), oldest first

    def _fits(self, n: int) -> bool:
        return self.held == 0 or self.held + n <= self.limit   # an image over the whole budget decodes alone

    def _take(self, n: int) -> None:
        self.held += n
        self.peak = max(self.peak, self.held)
        if self.on_change is not None:
            self.on_change(self.held)

    async def acquire(self, n: int, timeout: float) -> None:
        """Hold n pixels; waits behind older waiters; TimeoutError after `timeout` seconds."""
        if not self._waiters and self._fits(n):
            self._take(n)
            return
        entry = (n, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(entry[1], max(0.0, timeout))
        except BaseException:
            if entry[1].done() and not entry[1].cancelled():
                self.release(n)          # granted just as it gave up
            elif entry in self._waiters:
                self._waiters.remove(entry)
                self._grant()            # the next one may fit now
            raise

    def release(self, n: int) -> None:
        self.held -= n
        if self.on_change is not None:
            self.on_change(self.held)
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0]):
            n, future = self._waiters.popleft()
            if not future.done():
                self._take(n)
                future.set_result(None)


async def decode_all(files: dict[str, bytes], uses: dict[str, Use | None], budget: PixelBudget, max_pixels: int,
                     max_bytes: int, deadline: float) -> dict:
    """{field: bytes} -> {field: image}, each no larger than its use; ApiError naming the field (413, 422), or 504
    when the budget has no room before `deadline` (time.monotonic())."""
    images = {}
    for name, data in files.items():
        try:
            pending = await run_in_threadpool(open_image, data, max_pixels, max_bytes, uses.get(name))
            try:
                await budget.acquire(pending.pixels, deadline - time.monotonic())
            except asyncio.TimeoutError:
                raise ApiError(504, "deadline_exceeded", f"{name}: waited past --request-timeout-s for room to "
                               "decode (--max-decode-pixels); it was dropped before compute", name) from None
            images[name] = await _held(budget, pending)
        except ImageRejected as e:
            raise ApiError(e.status, e.code, str(e), name) from None
    return images


async def _held(budget: PixelBudget, pending):
    """The decode on a worker thread; its pixels go back to the budget when it ends, even if the request is
    cancelled meanwhile (the thread still holds them until then)."""
    def done(task: asyncio.Future) -> None:
        budget.release(pending.pixels)
        if not task.cancelled():
            task.exception()  # retrieved: a cancelled request's failed decode is not logged as unhandled

    task = asyncio.ensure_future(run_in_threadpool(load, pending))
    task.add_done_callback(done)
    return await asyncio.shield(task)
