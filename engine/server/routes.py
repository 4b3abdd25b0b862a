"""The API's routes: POST /v1/generate, POST /v1/edit (one request each: JSON or multipart in, JSON, a PNG or
server-sent events out) and GET /v1/models, all behind the API key when one is set."""
from __future__ import annotations

import asyncio
import logging
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ipadapter_instruct.engine.results import random_seed
from ipadapter_instruct.engine.server.batcher import Draining, Job, QueueFull
from ipadapter_instruct.engine.server.dependencies import authorize, engine_state
from ipadapter_instruct.engine.server.errors import ApiError
from ipadapter_instruct.engine.server.parsing import read_body
from ipadapter_instruct.engine.server.responses import encode_png, outcome, response_body
from ipadapter_instruct.engine.server.schemas import EditRequest, ErrorResponse, GenerateRequest, GenerateResponse, ModelList
from ipadapter_instruct.engine.server.state import ServerState
from ipadapter_instruct.engine.server.stream import progress_to, stream_events
from ipadapter_instruct.engine.server.uploads import decode_all
from ipadapter_instruct.engine.server.runners import FieldError

log = logging.getLogger("ipadapter_instruct.engine.server")
POLL_S = 0.1          # how often a waiting handler checks for a client that went away
RETRY_AFTER_S = 5     # 503 while starting (draining: the queue's expected wait)

router = APIRouter(dependencies=[Depends(authorize)])
ERRORS = {str(s): {"model": ErrorResponse} for s in (401, 404, 413, 422, 429, 500, 503, 504)}
IMAGE_ANSWERS = {**ERRORS, 200: {"content": {"image/png": {}, "text/event-stream": {}}}}


def body_schema(model) -> dict:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema},
                                                          "multipart/form-data": {"schema": {"type": "object"}}}}}


@router.get("/v1/models", response_model=ModelList)
async def models(state: ServerState = Depends(engine_state)):
    if state.runner is None:
        raise ApiError(503, "unavailable", "the model is still loading", headers={"retry-after": RETRY_AFTER_S})
    return {"object": "list", "data": [state.runner.describe(state.config)]}


@router.post("/v1/generate", response_model=GenerateResponse, responses=IMAGE_ANSWERS,
             openapi_extra=body_schema(GenerateRequest))
async def generate(request: Request, state: ServerState = Depends(engine_state)):
    """One request of `Pipeline.__call__`. JSON (ip_adapter_image as base64 or a data URL) or multipart/form-data
    (ip_adapter_image as a file part; `image` is its old name); the same for init_image and mask_image (start
    from a photo: img2img, and with a mask inpainting). `Accept: image/png` with one image answers the PNG;
    `stream: true` or `Accept: text/event-stream` answers server-sent events (`progress`, then `result` or
    `error`). Without a seed the server draws one; every answer says it (`seed`, and the `x-seed` header), and
    `seeds` gives each image's own (seed + j), which its PNG's "parameters" text chunk carries too."""
    return await handle(state, request, "generate", GenerateRequest,
                        ("ip_adapter_image", "control_image", "adapter_mask", "init_image", "mask_image"))


@router.post("/v1/edit", response_model=GenerateResponse, responses=IMAGE_ANSWERS,
             openapi_extra=body_schema(EditRequest))
async def edit(request: Request, state: ServerState = Depends(engine_state)):
    """One request of `EditPipeline.__call__` (InstructPix2Pix; the server must have loaded an IP2P model):
    `image` is the photo to edit, `ip_adapter_image` (old name `adapter_image`) the reference an adapter reads.
    The same bodies, seeds, answers and errors as /v1/generate."""
    return await handle(state, request, "edit", EditRequest, ("image", "ip_adapter_image"))


def check_serving(state: ServerState, task: str) -> None:
    """503 unless ready; 404 when the loaded model answers the other task."""
    if not state.ready:
        why = "shutting down" if state.draining else ("failed to load: " + state.failed if state.failed
                                                      else "still loading")
        wait = state.batcher.retry_after_s() if state.draining and state.batcher is not None else RETRY_AFTER_S
        raise ApiError(503, "unavailable", f"the server is {why}", headers={"retry-after": wait})
    if state.runner.task != task:
        other = "an InstructPix2Pix model: POST /v1/edit" if state.runner.task == "edit" else \
            "a text-to-image model: POST /v1/generate"
        raise ApiError(404, "wrong_task", f"this server has loaded {other}")


async def read_work(state: ServerState, request: Request, task: str, model, image_fields: tuple[str, ...]):
    """The body read, its images decoded and checked against the loaded model -> (request, work, deadline)."""
    req, files = await read_body(request, state.config.max_upload_mb, model, image_fields)
    return await prepare_work(state, task, req, files)


async def prepare_work(state: ServerState, task: str, req, files: dict):
    """A validated native request (GenerateRequest / EditRequest) and its images' bytes -> (request, work, deadline):
    the images decoded and everything checked against the loaded model. Every HTTP shape (this API, OpenAI's,
    Automatic1111's) comes through here with its request translated into the native one."""
    config, runner = state.config, state.runner
    if req.seed is None:  # a fresh seed per request, the Python API's own draw, answered so it can be reused
        req.seed = random_seed()
    deadline = time.monotonic() + config.request_timeout_s  # from its arrival: decode waits count too
    images = await decode_all(files, runner.uses(req), state.decode_budget, config.max_pixels,
                              int(config.max_upload_mb * 2**20), deadline)
    try:
        work = runner.prepare(req, images) if task == "edit" else \
            runner.prepare(req, images.get("ip_adapter_image"), images.get("control_image"),
                           images.get("adapter_mask"), images.get("init_image"), images.get("mask_image"))
    except FieldError as e:
        raise ApiError(422, "invalid_request", str(e), e.field) from None
    if work.rows > config.max_batch_rows:
        raise ApiError(422, "invalid_request", f"this request needs {work.rows} UNet rows (guidance branches x "
                       f"num_images_per_prompt), over --max-batch-rows {config.max_batch_rows}",
                       "num_images_per_prompt")
    return req, work, deadline


async def handle(state: ServerState, request: Request, task: str, model, image_fields: tuple[str, ...]):
    check_serving(state, task)
    req, work, deadline = await read_work(state, request, task, model, image_fields)
    rid = request.scope["state"]["request_id"]
    stream = req.stream or "text/event-stream" in request.headers.get("accept", "")
    events: asyncio.Queue | None = asyncio.Queue() if stream else None
    progress = None if events is None else progress_to(events, asyncio.get_running_loop())
    seed = {"x-seed": str(req.seed)}
    job = submit(state, work, deadline, progress)
    if events is not None:
        return StreamingResponse(stream_events(state.batcher, job, events, rid), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", **seed})
    result = await wait_for(state, job, request)
    if request.headers.get("accept", "").startswith("image/png") and len(result["images"]) == 1:
        png = await run_in_threadpool(encode_png, result, 0)
        return Response(png, media_type="image/png", headers=seed)
    return JSONResponse(await run_in_threadpool(response_body, job, result, rid), headers=seed)


def submit(state: ServerState, work, deadline: float, progress=None) -> Job:
    """Queue a prepared request (the batch key from the runner); 429 / 503 when it cannot be queued."""
    job = Job(work, state.runner.key(work), work.rows, deadline, progress)
    try:
        state.batcher.submit(job)
    except QueueFull as e:
        raise ApiError(429, "queue_full", str(e), headers={"retry-after": state.batcher.retry_after_s()}) from None
    except Draining as e:
        raise ApiError(503, "unavailable", str(e), headers={"retry-after": state.batcher.retry_after_s()}) from None
    return job


async def run_native(state: ServerState, request: Request, task: str, req, files: dict):
    """A translated request (a validated GenerateRequest / EditRequest and its images' bytes) run as the native
    routes run theirs: the same checks, queue, batching and limits. -> (request, job, result); ApiError 4xx/5xx."""
    check_serving(state, task)
    req, work, deadline = await prepare_work(state, task, req, files)
    job = submit(state, work, deadline)
    return req, job, await wait_for(state, job, request)


async def wait_for(state: ServerState, job: Job, request: Request):
    """The job's result. While it is queued: dropped if the client goes away, 504 past its deadline."""
    batcher = state.batcher
    while True:
        done, _ = await asyncio.wait({job.future}, timeout=POLL_S)
        if done:
            return outcome(job, request.scope["state"]["request_id"])
        if job.started is not None and getattr(batcher, "mid_flight", False):
            # step-level batching: a running request leaves the batch at the next step when its client goes
            # (its deadline no longer applies: it finishes)
            if await request.is_disconnected() and batcher.withdraw(job):
                log.info("client went away: request %s leaves the running batch", job.id)
                raise ApiError(499, "client_closed", "client closed the request")
        elif job.started is None:
            if time.monotonic() >= job.deadline and batcher.withdraw(job):
                raise ApiError(504, "deadline_exceeded", f"still queued after --request-timeout-s "
                               f"{state.config.request_timeout_s:g} s; it was dropped before compute")
            if await request.is_disconnected() and batcher.withdraw(job):
                log.info("client went away: request %s dropped from the queue", job.id)
                raise ApiError(499, "client_closed", "client closed the request")
