"""Run the app under uvicorn on one process. SIGTERM (or Ctrl-C) drains: /ready turns false, new requests get 503,
queued and running ones finish, then the server stops and the process exits 0. A second signal stops at once. A
model that fails to load stops the server too (exit 1, the reason on stderr): it could never become ready."""
from __future__ import annotations

import asyncio
import logging
import signal
import socket

import uvicorn

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.server.app import create_app
from ipadapter_instruct.engine.server.config import ServerConfig
from ipadapter_instruct.engine.server.protocol import timed_protocol

log = logging.getLogger("ipadapter_instruct.engine.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state):
        super().__init__(config)
        self.state, self._draining = state, None

    def handle_exit(self, sig, frame) -> None:
        # uvicorn's own handler stops accepting at once and re-raises the signal after shutdown (exit 143);
        # here the first signal drains and the process exits 0, a second one stops now
        if self._draining is not None:
            self.force_exit = self.should_exit = True
            return
        name = signal.Signals(sig).name
        log.info("%s: draining (no new requests; finishing %d queued and running)", name, self._pending())
        loop = asyncio.get_event_loop()
        self._draining = loop.create_task(self._drain())

    def _pending(self) -> int:
        b = self.state.batcher
        return len(b.queue) + len(b.running) if b is not None else 0

    async def _drain(self) -> None:
        await self.state.drain()
        log.info("drained: stopping")
        self.should_exit = True


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise EngineError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def uvicorn_server(config: ServerConfig, pipe, url: str) -> DrainingServer:
    """The app under uvicorn with the header timeout (protocol.py); `run(sockets=[sock])` serves on a bound socket."""
    app = create_app(config, pipe)
    app.state.engine.url = url
    uconfig = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30, access_log=False,
                             http=timed_protocol(config.header_timeout_s))
    return DrainingServer(uconfig, app.state.engine)


def serve(config: ServerConfig, pipe=None) -> int:
    """Serve until SIGTERM/SIGINT; port 0 picks a free one (the ready line says which)."""
    sock = bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    server = uvicorn_server(config, pipe, f"http://{'[' + host + ']' if ':' in host else host}:{port}")
    state = server.state
    state.on_failure = lambda: setattr(server, "should_exit", True)  # a server that can never be ready stops
    print(f"listening on {state.url} (loading the model; /ready turns true when it can serve)", flush=True)
    server.run(sockets=[sock])
    if state.failed:
        raise EngineError(f"could not load the model: {state.failed}")
    return 0
