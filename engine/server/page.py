"""The web page at `/`: static/index.html with the instruction presets and the loaded model's task filled in."""
from __future__ import annotations

import json
from importlib import resources

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse

from ipadapter_instruct.engine.server.dependencies import engine_state
from ipadapter_instruct.engine.server.schemas import TASK_PRESETS
from ipadapter_instruct.engine.server.state import ServerState

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page(state: ServerState = Depends(engine_state)):
    html = resources.files("ipadapter_instruct.engine.server").joinpath("static/index.html").read_text(encoding="utf-8")
    runner = state.runner  # the page's form follows the model: /v1/generate, or /v1/edit for InstructPix2Pix
    config = {"task": runner.task if runner is not None else "generate",
              "adapter": runner.kind if runner is not None else None}
    return html.replace("{{TASK_PRESETS}}", json.dumps(TASK_PRESETS).replace("<", "\\u003c")).replace(
        "{{PAGE_CONFIG}}", json.dumps(config).replace("<", "\\u003c"))
