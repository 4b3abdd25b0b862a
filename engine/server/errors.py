"""HTTP errors as JSON `{error: {code, message, field?}, request_id}`, and the two pure-ASGI middlewares that
must act before a body is read: the request id and the body's limits (413 while reading, not after; 408 for a body
slower than --body-timeout-s; 400 for one that ends before its Content-Length)."""
from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from types import SimpleNamespace

from ipadapter_instruct.engine.errors import EngineError

GOOD_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
log = logging.getLogger("ipadapter_instruct.engine.server")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = {k: str(v) for k, v in (headers or {}).items()}


class FieldError(EngineError):
    """A request that the loaded model cannot run, naming the field (HTTP 422)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def error_body(code: str, message: str, request_id: str | None, field: str | None = None) -> dict:
    detail = {"code": code, "message": message}
    if field is not None:
        detail["field"] = field
    return {"error": detail, "request_id": request_id}


def internal_message(request_id: str | None) -> str:
    """What a 500 says: nothing of the exception (paths, values), which goes to the log with the same id."""
    return f"internal error (request id {request_id}); the detail is in the server's log"


async def send_json(send, status: int, body: dict, headers: dict | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


class RequestId:
    """scope["state"]["request_id"]: the client's X-Request-Id when it is sane, else a new one; echoed back."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if GOOD_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), (b"x-request-id", rid.encode())])
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass


class ShortBody(Exception):
    pass


def tracked(send):
    """An ASGI send that notes when the response starts (after that an error can no longer be answered).
    -> (send, a namespace whose .started says so)."""
    response = SimpleNamespace(started=False)

    async def tracking_send(message):
        if message["type"] == "http.response.start":
            response.started = True
        await send(message)
    return tracking_send, response


class BodyLimit:
    """The body of a request, as the app reads it: 413 over `max_bytes` (at once from Content-Length, else as soon as
    the bytes read pass it), 408 unless all of it arrives within `timeout_s` of the request's start, 400 when the
    client closes the connection before its last byte. Once the body is read, `receive` is the server's own."""

    def __init__(self, app, max_bytes: int, timeout_s: float = 60.0):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = scope.get("state", {}).get("request_id")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await send_json(send, 413, error_body("payload_too_large", self.too_large(), rid),
                                   {"connection": "close"})
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        seen, done = 0, False

        async def limited_receive():
            nonlocal seen, done
            if done:
                return await receive()
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                raise BodyTimeout(f"the request body did not arrive within --body-timeout-s {self.timeout_s:g} s "
                                  f"({seen} bytes came{self.of(length)})") from None
            if msg["type"] == "http.disconnect":
                done = True
                raise ShortBody(f"the client closed the connection after {seen} bytes of its body{self.of(length)}")
            seen += len(msg.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge()
            done = not msg.get("more_body", False)
            return msg

        tracking_send, response = tracked(send)
        try:
            await self.app(scope, limited_receive, tracking_send)
        except (BodyTooLarge, BodyTimeout, ShortBody) as e:
            status, code, message = {BodyTooLarge: (413, "payload_too_large", self.too_large()),
                                     BodyTimeout: (408, "body_timeout", str(e)),
                                     ShortBody: (400, "incomplete_body", str(e))}[type(e)]
            log.info("request %s: %s", rid, message)
            if not response.started:
                await send_json(send, status, error_body(code, message, rid), {"connection": "close"})

    def too_large(self) -> str:
        return f"request body is over the {self.max_bytes}-byte limit (--max-upload-mb)"

    @staticmethod
    def of(length: bytes | None) -> str:
        return f" of the {length.decode()} its Content-Length announced" if length is not None else ""
