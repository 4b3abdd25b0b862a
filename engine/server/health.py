"""The operator's routes: GET /health (the process is alive), /ready (it can serve: 503 until then and while
draining) and /metrics (Prometheus); none needs the API key."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from ipadapter_instruct.engine.server.dependencies import engine_state
from ipadapter_instruct.engine.server.state import ServerState, task_name

router = APIRouter()


@router.get("/health", summary="the process is alive")
async def health():
    return {"status": "ok"}


@router.get("/ready", summary="weights loaded, warmed up and not draining (503 otherwise)")
async def ready(state: ServerState = Depends(engine_state)):
    body = {"ready": state.ready, "draining": state.draining, "error": state.failed,
            "ready_after_s": state.ready_s, "task": task_name(state.pipe.kind) if state.runner is not None else None,
            "fast_path": state.pipe.fast_path_report() if state.runner is not None else None}
    return JSONResponse(body, status_code=200 if state.ready else 503)


@router.get("/metrics", summary="Prometheus text format")
async def metrics(state: ServerState = Depends(engine_state)):
    if state.runner is not None:
        state.metrics.fast_path(state.pipe.fast_path_report())
    return Response(state.metrics.render(), media_type=state.metrics.content_type)
