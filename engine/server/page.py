"""The web page at `/`: static/index.html with the instruction presets, the loaded model's task (and whether it is an
inpainting one) and the request's defaults (the schema's, which are the Python API's; a photo's strengths, the
pipeline's) filled in, so the form cannot drift from the API."""
from __future__ import annotations

import json
from importlib import resources

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse

from ipadapter_instruct.engine.img2img import STRENGTH, inpainting_unet
from ipadapter_instruct.engine.server.dependencies import engine_state
from ipadapter_instruct.engine.server.schemas import TASK_PRESETS, EditRequest, GenerateRequest
from ipadapter_instruct.engine.server.state import ServerState

router = APIRouter()
FORM_DEFAULTS = ("num_inference_steps", "guidance_scale", "image_guidance_scale", "scale")  # the form's numbers


def defaults(task: str) -> dict:
    """The request's defaults that the form shows, for /v1/generate or /v1/edit."""
    fields = (EditRequest if task == "edit" else GenerateRequest).model_fields
    return {name: fields[name].default for name in FORM_DEFAULTS}


def photo_config(runner) -> dict:
    """Starting from a photo: whether the model is an inpainting one (a photo and a mask are required) and the
    strengths the pipeline defaults to (img2img, inpaint), which the slider starts at."""
    pipe = getattr(runner, "pipe", None)
    inpainting = pipe is not None and runner.task == "generate" and inpainting_unet(pipe)
    return {"inpainting": inpainting, "strength": dict(getattr(pipe, "STRENGTH", STRENGTH))}


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page(state: ServerState = Depends(engine_state)):
    html = resources.files("ipadapter_instruct.engine.server").joinpath("static/index.html").read_text(encoding="utf-8")
    runner = state.runner  # the page's form follows the model: /v1/generate, or /v1/edit for InstructPix2Pix
    task = runner.task if runner is not None else "generate"
    config = {"task": task, "adapter": runner.kind if runner is not None else None, "defaults": defaults(task),
              **photo_config(runner)}
    return html.replace("{{TASK_PRESETS}}", json.dumps(TASK_PRESETS).replace("<", "\\u003c")).replace(
        "{{PAGE_CONFIG}}", json.dumps(config).replace("<", "\\u003c"))
