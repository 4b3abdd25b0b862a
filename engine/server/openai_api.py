"""OpenAI's images API, translated into the native request: POST /v1/images/generations (JSON) and
POST /v1/images/edits (multipart), answered as OpenAI answers (`{"created", "data": [{"b64_json",
"revised_prompt"}]}`, plus `seed` and `seeds`) and erring in OpenAI's shape (`{"error": {"message", "type", "param",
"code"}}`) with the native routes' status codes. Every native field rides along in the body, as OpenAI clients send
`extra_body`; the request then runs through `routes.run_native`, the native routes' own checks, queue and batching.
(GET /v1/models is the native route: its cards carry OpenAI's model fields too.)"""
from __future__ import annotations

import base64
import re
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from ipadapter_instruct.engine.server.dependencies import authorize, engine_state
from ipadapter_instruct.engine.server.errors import ApiError
from ipadapter_instruct.engine.server.images import ImageRejected, from_base64
from ipadapter_instruct.engine.server.parsing import parse_json, raise_first, read_form
from ipadapter_instruct.engine.server.responses import encode_png
from ipadapter_instruct.engine.server.routes import run_native
from ipadapter_instruct.engine.server.schemas import EditRequest, GenerateRequest
from ipadapter_instruct.engine.server.shapes import shaped_route
from ipadapter_instruct.engine.server.state import ServerState

SIZE = re.compile(r"^([0-9]{1,6})x([0-9]{1,6})$")
# OpenAI's own fields: model, n, size and response_format read; quality, style and the rest accepted, ignored
OPENAI_ONLY = ("model", "n", "size", "response_format", "user", "quality", "style", "background", "output_format",
               "output_compression", "moderation", "partial_images", "safety_identifier", "input_fidelity")
IMAGE_FIELDS = ("ip_adapter_image", "control_image", "adapter_mask", "init_image", "mask_image")
EDIT_FILES = ("image", "mask", *IMAGE_FIELDS)
TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         409: "conflict_error", 413: "invalid_request_error", 415: "invalid_request_error",
         422: "invalid_request_error", 429: "rate_limit_error"}


def openai_error(status: int, code: str, message: str, param: str | None, headers: dict | None = None):
    kind = TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


# every error on these routes (the API key's 401 included) in OpenAI's shape
router = APIRouter(dependencies=[Depends(authorize)], route_class=shaped_route(
    lambda request, e: openai_error(e.status, e.code, e.message, e.field, e.headers)))


@router.post("/v1/images/generations")
async def generations(request: Request, state: ServerState = Depends(engine_state)):
    """OpenAI's image generation: prompt, model (the loaded one's id, or none), n, size "WxH", response_format
    b64_json; quality, style and user accepted and ignored; any native /v1/generate field (extra_body)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "unsupported_media_type", "send application/json", "content-type")
    fields = parse_json(await request.body(), "body")
    if not isinstance(fields, dict):
        raise ApiError(400, "invalid_json", "body must be a JSON object", "body")
    native = translate(state, fields)
    req = validated(GenerateRequest, native)
    files = {name: decoded(getattr(req, name), name) for name in IMAGE_FIELDS if getattr(req, name) is not None}
    return await answer(state, request, "generate", req, files, "size" in fields)


@router.post("/v1/images/edits")
async def edits(request: Request, state: ServerState = Depends(engine_state)):
    """OpenAI's image edit (multipart: image, prompt, mask, n, size, response_format; any native field as a form
    field): on an InstructPix2Pix server an edit of `image`; on a text-to-image server `image` is init_image, with
    `mask` an inpainting, without it img2img at the engine's default strength (0.8)."""
    fields, files = await read_form(request, state.config.max_upload_mb, EDIT_FILES)
    files |= {k: decoded(fields.pop(k), k) for k in EDIT_FILES if isinstance(fields.get(k), str)}
    if "image" not in files:
        raise ApiError(400, "invalid_request", "image: the photo to edit is required (a file part)", "image")
    native = translate(state, fields)
    edit = state.runner is not None and state.runner.task == "edit"
    if edit:
        if "mask" in files:
            raise ApiError(400, "invalid_request", "mask: an InstructPix2Pix server edits the whole photo; "
                           "send no mask", "mask")
        model = EditRequest
    else:
        model = GenerateRequest
        files = {("init_image" if k == "image" else "mask_image" if k == "mask" else k): v for k, v in files.items()}
    req = validated(model, native)
    return await answer(state, request, "edit" if edit else "generate", req, files, "size" in fields)


def translate(state: ServerState, fields: dict) -> dict:
    """An OpenAI body -> the native fields (model checked, n and size renamed, response_format checked)."""
    model = fields.get("model")
    if model is not None and state.runner is not None:
        loaded = state.runner.describe(state.config)["id"]
        if model != loaded:
            raise ApiError(404, "model_not_found", f"model {model!r}: this server serves {loaded!r} "
                           "(GET /v1/models); send that or no model", "model")
    if fields.get("response_format", "b64_json") not in ("b64_json", None):
        raise ApiError(400, "invalid_request", f"response_format {fields['response_format']!r}: only b64_json; "
                       "this server keeps no files to link to", "response_format")
    if fields.get("stream") not in (None, False, "false"):
        raise ApiError(400, "invalid_request", "stream: this server answers OpenAI's routes whole; for progress "
                       "events use POST /v1/generate with stream", "stream")
    native = {k: v for k, v in fields.items() if k not in OPENAI_ONLY and k != "stream"}
    if fields.get("n") is not None:
        native["num_images_per_prompt"] = fields["n"]
    size = fields.get("size")
    if size not in (None, "auto"):
        match = SIZE.match(str(size))
        if match is None:
            raise ApiError(400, "invalid_request", f"size {size!r}: give WIDTHxHEIGHT in pixels, e.g. 512x512, "
                           "or auto (the model's own)", "size")
        native["width"], native["height"] = int(match[1]), int(match[2])
    return native


def validated(model, native: dict):
    try:
        return model.model_validate(native)
    except ValidationError as e:
        errors = [{**err, "loc": ("n",) if err.get("loc") == ("num_images_per_prompt",) else err.get("loc", ())}
                  for err in e.errors()]
        raise_first(errors)


def decoded(text: str, field: str) -> bytes:
    try:
        return from_base64(text)
    except ImageRejected as e:
        raise ApiError(e.status, e.code, str(e), field) from None


async def answer(state: ServerState, request: Request, task: str, req, files: dict, sized: bool):
    try:
        req, job, result = await run_native(state, request, task, req, files)
    except ApiError as e:
        if sized and e.field in ("height", "width"):
            e.field = "size"
        raise
    images = await run_in_threadpool(lambda: [base64.b64encode(encode_png(result, j)).decode()
                                              for j in range(len(result["images"]))])
    return {"created": int(time.time()), "data": [{"b64_json": im, "revised_prompt": req.prompt} for im in images],
            "seed": req.seed, "seeds": result["seeds"]}
