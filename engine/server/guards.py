"""Who may ask what, and what every answer to a generate call is counted as: the pure-ASGI middlewares around the
app and the OpenAPI pages behind the key.

- `HostOrigin` (no API key, or --allowed-hosts given): a Host header that names none of the served names is a 403
  (DNS rebinding: a page on evil.example re-resolved to 127.0.0.1 still sends `Host: evil.example`), and so is an
  Origin header that is neither --cors-origin nor the server's own (a cross-site form or fetch from a browser).
  Served names: --allowed-hosts, else those of --host: 127.0.0.1, localhost and [::1] for a loopback address, the
  address itself for another, any for 0.0.0.0 / ::. The port is not compared (an ssh tunnel or port mapping changes
  it; DNS rebinding changes the name).
- `InternalErrors`: an exception that escapes the app is a 500 saying "internal error" with the request id; the
  exception and its traceback go to the log once, under the same id.
- `StatusCounter`: engine_requests{status} for every answer to POST /v1/generate, the 4xx of the layers above
  included.
"""
from __future__ import annotations

import ipaddress
import logging

from ipadapter_instruct.engine.server.errors import error_body, internal_message, send_json, tracked

log = logging.getLogger("ipadapter_instruct.engine.server")
ANY = frozenset({"0.0.0.0", "::", "[::]", ""})


def host_name(host: str) -> str:
    """The name part of a Host header or --host value, lower case, IPv6 in brackets: 'LocalHost:80' -> 'localhost'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    if host.count(":") > 1:  # a bare IPv6 address (a --host value)
        return f"[{host}]"
    return host.split(":", 1)[0].rstrip(".")


def is_loopback(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def served_hosts(config, keyed: bool) -> frozenset[str] | None:
    """The Host names answered, or None for any (a key set and no --allowed-hosts: the key is the guard)."""
    if config.allowed_hosts is not None:
        names = frozenset(host_name(h) for h in config.allowed_hosts.split(",") if h.strip())
        return None if "*" in names else names
    if keyed or config.host.strip().lower() in ANY:
        return None
    own = host_name(config.host)
    return frozenset({own, "127.0.0.1", "localhost", "[::1]"}) if is_loopback(own) else frozenset({own})


class HostOrigin:
    def __init__(self, app, hosts: frozenset[str] | None, origins: frozenset[str] | None):
        """origins: the allowed Origin values besides the server's own; None checks no Origin (a key is set)."""
        self.app, self.hosts, self.origins = app, hosts, origins

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        refusal = None
        if self.hosts is not None and host_name(host) not in self.hosts:
            refusal = ("host", f"Host {host!r} is not a name this server answers to ({', '.join(sorted(self.hosts))}"
                               f"; --allowed-hosts adds names)")
        origin = headers.get(b"origin")
        if refusal is None and origin is not None and self.origins is not None:
            o = origin.decode("latin-1").strip()
            if o not in self.origins and o.lower() not in (f"http://{host}".lower(), f"https://{host}".lower()):
                allowed = f"--cors-origin {', '.join(sorted(self.origins))}" if self.origins else "no --cors-origin"
                refusal = ("origin", f"Origin {o!r} is another site's ({allowed}); pages of other origins may not "
                                     f"call a server without an API key")
        if refusal is None:
            return await self.app(scope, receive, send)
        rid = scope.get("state", {}).get("request_id")
        await send_json(send, 403, error_body("forbidden", refusal[1], rid, refusal[0]))


class InternalErrors:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        tracking_send, response = tracked(send)
        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            rid = scope.get("state", {}).get("request_id")
            log.exception("request %s (%s %s) failed", rid, scope.get("method"), scope.get("path"))
            if not response.started:
                await send_json(send, 500, error_body("internal", internal_message(rid), rid))


# the routes that generate, in every HTTP shape (native, OpenAI's, Automatic1111's): engine_requests counts them all
GENERATING = frozenset(("/v1/generate", "/v1/edit", "/v1/images/generations", "/v1/images/edits",
                        "/sdapi/v1/txt2img", "/sdapi/v1/img2img"))


class StatusCounter:
    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in GENERATING:
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def add_docs(app, authorize) -> None:
    """/openapi.json, /docs and /redoc behind the key (FastAPI's own are turned off when a key is set)."""
    from fastapi import Depends
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
    from fastapi.responses import JSONResponse

    guarded = {"dependencies": [Depends(authorize)], "include_in_schema": False}

    @app.get("/openapi.json", **guarded)
    async def openapi():
        return JSONResponse(app.openapi())

    @app.get("/docs", **guarded)
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

    @app.get("/redoc", **guarded)
    async def redoc():
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")
