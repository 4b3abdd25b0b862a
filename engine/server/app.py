"""The FastAPI app: the state (state.py), the middleware, the JSON error handlers and the routers (page.py,
health.py, routes.py) wired together.

`create_app(config, pipe=None)` returns the app; the weights load (unless `pipe` is given) and warm up in the
background after start-up, so /health answers at once and /ready turns true when the model can serve.
"""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException

from ipadapter_instruct.engine.server import a1111_api, health, openai_api, page, routes
from ipadapter_instruct.engine.server.config import ServerConfig
from ipadapter_instruct.engine.server.dependencies import authorize
from ipadapter_instruct.engine.server.errors import ApiError, BodyLimit, RequestId
from ipadapter_instruct.engine.server.guards import HostOrigin, InternalErrors, StatusCounter, add_docs, served_hosts
from ipadapter_instruct.engine.server.responses import error_response, first_validation_error
from ipadapter_instruct.engine.server.state import ServerState


def create_app(config: ServerConfig | None = None, pipe=None) -> FastAPI:
    config = config or ServerConfig()
    state = ServerState(config, pipe)
    keyed = state.api_key is not None  # with a key, the OpenAPI pages are behind it (add_docs)
    app = FastAPI(title="IPAdapter-Instruct engine", version="0.1.0", lifespan=lifespan,
                  description="Instruction-guided image conditioning on Stable Diffusion, with dynamic batching.",
                  **({"docs_url": None, "redoc_url": None, "openapi_url": None} if keyed else {}))
    app.state.engine = state
    add_middleware(app, config, state, keyed)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    if keyed:
        add_docs(app, authorize)
    for router in (page.router, health.router, routes.router, openai_api.router, a1111_api.router):
        app.include_router(router)
    return app


@asynccontextmanager
async def lifespan(app: FastAPI):
    state: ServerState = app.state.engine
    loading = asyncio.create_task(state.start())
    try:
        yield
    finally:
        loading.cancel()
        await state.stop()


def add_middleware(app: FastAPI, config: ServerConfig, state: ServerState, keyed: bool) -> None:
    # outermost last: request id, CORS, the count, Host/Origin, 500s, the body's limits
    app.add_middleware(BodyLimit, max_bytes=int(config.max_upload_mb * 1024 * 1024), timeout_s=config.body_timeout_s)
    app.add_middleware(InternalErrors)
    app.add_middleware(HostOrigin, hosts=served_hosts(config, keyed),
                       origins=None if keyed else frozenset({config.cors_origin} - {None}))
    app.add_middleware(StatusCounter, metrics=state.metrics)
    if config.cors_origin:
        app.add_middleware(CORSMiddleware, allow_origins=[config.cors_origin], allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type", "accept", "x-request-id"],
                           expose_headers=["x-request-id", "x-seed"])
    app.add_middleware(RequestId)


async def api_error(request: Request, e: ApiError):
    return error_response(request, e.status, e.code, e.message, e.field, e.headers)


async def validation_error(request: Request, e: RequestValidationError):
    return first_validation_error(request, e.errors())


async def http_error(request: Request, e: StarletteHTTPException):
    codes = {404: "not_found", 405: "method_not_allowed"}
    return error_response(request, e.status_code, codes.get(e.status_code, "http_error"), str(e.detail),
                          headers=getattr(e, "headers", None))
