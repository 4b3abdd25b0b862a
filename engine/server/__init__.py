"""`python -m engine serve`: the engine behind HTTP with dynamic batching (FastAPI + uvicorn), and under Ray Serve.

Layout: schemas.py (request/response bodies), batcher.py (dynamic batching, no HTTP), runners.py (the runners: one
Pipeline call per batch), cache.py (conditioning caches), metrics.py (Prometheus), images.py (condition image
bytes), errors.py (JSON errors, request ids, upload limit), state.py (what the server holds: pipeline, runner,
batcher, cache; built in one place), routes.py (/v1/generate, /v1/edit, /v1/models) with stream.py (server-sent
events), health.py (/health, /ready, /metrics), page.py (the web page), responses.py (what the routes answer),
dependencies.py (the state and the API key for the routes), app.py (the FastAPI app wiring them), run.py (uvicorn
with a draining shutdown), ray_app.py (Ray Serve). The pipeline knows nothing of the server. ray_reaper.py removes
what the local Ray instance of `serve --ray` leaves when the process ends.
"""
from ipadapter_instruct.engine.server.config import ServerConfig

__all__ = ["ServerConfig", "create_app", "serve"]


def __getattr__(name):
    if name == "create_app":
        from ipadapter_instruct.engine.server.app import create_app
        return create_app
    if name == "serve":
        from ipadapter_instruct.engine.server.run import serve
        return serve
    raise AttributeError(f"module 'ipadapter_instruct.engine.server' has no attribute {name!r}")
