"""uvicorn's HTTP protocol with a header read timeout: a connection that opens and sends nothing, or sends part of a
request's headers and stalls, is closed `header_timeout_s` after it opened (or after its previous answer, for
the next request on a kept-alive connection). uvicorn times out only idle kept-alive connections after an
answer (`timeout_keep_alive`), never one that has yet to send its first request, so 20,000 silent connections
held 20,000 file descriptors. The body's own timeout is BodyLimit's (errors.py), where the app can answer 408.
"""
from __future__ import annotations

import asyncio

from uvicorn.protocols.http.auto import AutoHTTPProtocol


class HeaderTimeout:
    """Mixed into uvicorn's protocol class (httptools or h11, both keep the request in flight as `self.cycle`)."""

    header_timeout_s: float = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self._between_requests():
            self._arm()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._waiting_after = self.cycle  # headers are complete once a new cycle stands in its place
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timed_out)

    def _disarm(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.cycle is self._waiting_after and self._between_requests():
            self.transport.close()  # nothing, or a partial header, within the limit: no answer owed
        elif self._between_requests():
            self._arm()  # a request came and was answered meanwhile: time the next one from now
        # else a request is in flight: its body is BodyLimit's to time, and after its answer uvicorn's keep-alive


def timed_protocol(header_timeout_s: float) -> type:
    """uvicorn's own protocol class (httptools where installed, else h11) with the header timeout."""
    return type("TimedHTTPProtocol", (HeaderTimeout, AutoHTTPProtocol), {"header_timeout_s": header_timeout_s})
