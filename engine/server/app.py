"""The FastAPI app: wires the schemas, the batcher, the pipeline runner, the caches and the metrics together.

`create_app(config, pipe=None)` returns the app; the weights load (unless `pipe` is given) and warm up in the
background after start-up, so /health answers at once and /ready turns true when the model can serve.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import time
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import EngineError
from ..selfcheck import summary
from .batcher import Batcher, DeadlineExceeded, Draining, Job, QueueFull, worker_thread
from .stepper import Cancelled
from .cache import ConditioningCache
from .config import ServerConfig
from .errors import ApiError, BodyLimit, RequestId, error_body, internal_message
from .guards import HostOrigin, InternalErrors, StatusCounter, add_docs, served_hosts
from .uploads import PixelBudget, decode_all
from .metrics import Metrics
from .parsing import raise_first, read_body
from .schemas import EditRequest, ErrorResponse, GenerateRequest, GenerateResponse, ModelList
from .worker import EditRunner, FieldError, PipelineRunner

log = logging.getLogger("engine.server")
POLL_S = 0.1          # how often a waiting handler checks for a client that went away
RETRY_AFTER_S = 5     # 503 while starting (draining: the queue's expected wait)


class ServerState:
    """Everything one app instance holds; `start()` loads and warms up, `drain()` finishes and refuses."""

    def __init__(self, config: ServerConfig, pipe=None):
        self.config, self.pipe = config, pipe
        self.metrics = Metrics()
        self.decode_budget = PixelBudget(config.max_decode_pixels, self.metrics.decode_pixels.set)
        self.api_key = config.api_key()
        self.runner = self.batcher = self.cache = None
        self.ready = self.draining = False
        self.failed: str | None = None
        self.t_created = time.monotonic() - process_age_s()
        self.ready_s: float | None = None
        self.url: str | None = None   # set by whoever binds the socket, for the ready line
        self.worker = worker_thread()  # loads, warms up and runs the model: torch on one thread only
        self.on_failure = None         # called when loading fails (the standalone server then exits 1)

    async def start(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self.worker, self._load)
        except Exception as e:  # the process stays up and says why on /ready and in the log
            self.failed = str(e) if isinstance(e, EngineError) else f"{type(e).__name__}: {e}"
            if self.on_failure is not None:  # the standalone server stops and prints it as its one error line
                self.on_failure()
            else:
                log.error("could not load the model: %s", self.failed)
            return
        if self.draining:  # SIGTERM came while loading: never turn ready
            return
        c = self.config
        if c.batching == "step":
            from .stepper import StepBatcher
            self.batcher = StepBatcher(self.runner, c.max_batch_rows, c.max_queue, observer=self.metrics,
                                       executor=self.worker)
        else:
            self.batcher = Batcher(self.run, c.max_batch_rows, c.max_wait_ms, c.max_queue, observer=self.metrics,
                                   executor=self.worker)
        self.batcher.start()
        self.ready_s = time.monotonic() - self.t_created
        self.ready = True
        self.metrics.ready.set(1)
        p = self.pipe
        print(f"ready: {self.url or 'app'} ({self.runner.kind or 'text-to-image'}, {p.device}, "
              f"{str(p.dtype).replace('torch.', '')}, {p.attention_backend} attention, {c.batching}-level batching; "
              f"{self.ready_s:.1f} s "
              f"after the process started)", flush=True)

    def run(self, jobs: list[Job], progress) -> list[dict]:
        return self.runner([job.payload for job in jobs], progress)

    def _load(self) -> None:
        c = self.config
        if self.pipe is None:
            from ..loading import is_edit_model
            if c.model is not None and c.backend == "pytorch" and is_edit_model(c.model, c.model_config):
                from ..edit import EditPipeline as Pipeline  # an InstructPix2Pix model: this server edits
            else:
                from ..pipeline import Pipeline
            self.pipe = Pipeline.from_pretrained(c.model, image_encoder=c.image_encoder, adapter=c.adapter,
                                                 device=c.device, dtype=c.dtype, attention_backend=c.attention_backend,
                                                 backend=c.backend, engines=c.engines, trt=c.trt,
                                                 verify_fast_path=c.verify_fast_path,
                                                 **({"config": c.model_config} if c.model_config else {}),
                                                 **({"controlnet": list(c.controlnet)} if c.controlnet else {}))
            for path, scale in c.lora:  # fused: nothing per step
                self.pipe.load_lora_weights(path, scale=scale)
        self.pipe.set_progress_bar_config(disable=True)
        if c.compile:
            self.pipe.compile()
        if c.cuda_graphs:
            self.pipe.enable_cuda_graphs()  # EngineError off CUDA
        self.cache = ConditioningCache(c.cache_size)
        self.cache.attach(self.pipe)
        self.runner = (EditRunner if getattr(self.pipe, "EDIT", False) else PipelineRunner)(self.pipe)
        if c.batching == "step" and not self.pipe.cross:
            raise EngineError("--batching step runs on the PyTorch backend; this server loads exported graphs: use "
                              "--batching request")
        if c.warmup:  # one 1-step request at the native size: kernels, allocator and caches ready before /ready
            t0 = time.perf_counter()
            self.runner([self.runner.warmup_work()])
            print(f"warm-up: one 1-step request in {(time.perf_counter() - t0) * 1e3:.0f} ms; "
                  f"{summary(self.pipe.fast_path_report())}", flush=True)
        self.cache.on_lookup = self.metrics.lookup  # counted from the first real request on

    async def drain(self) -> None:
        self.ready, self.draining = False, True
        self.metrics.ready.set(0)
        if self.batcher is not None:
            await self.batcher.drain()

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        self.worker.shutdown(wait=False)


def process_age_s() -> float:
    """Seconds since this process started (so /ready's figure counts the imports too); 0 if unknown."""
    try:
        import psutil
        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:
        return 0.0


def error_response(request: Request, status: int, code: str, message: str, field=None, headers=None):
    rid = request.scope.get("state", {}).get("request_id")
    return JSONResponse(error_body(code, message, rid, field), status_code=status, headers=headers)


def create_app(config: ServerConfig | None = None, pipe=None) -> FastAPI:
    config = config or ServerConfig()
    state = ServerState(config, pipe)

    @asynccontextmanager
    async def lifespan(app):
        loading = asyncio.create_task(state.start())
        try:
            yield
        finally:
            loading.cancel()
            await state.stop()

    keyed = state.api_key is not None  # with a key, the OpenAPI pages are behind it (add_docs)
    app = FastAPI(title="IPAdapter-Instruct engine", version="0.1.0", lifespan=lifespan,
                  description="Instruction-guided image conditioning on Stable Diffusion, with dynamic batching.",
                  **({"docs_url": None, "redoc_url": None, "openapi_url": None} if keyed else {}))
    app.state.engine = state
    # outermost last: request id, CORS, the count, Host/Origin, 500s, the body's limits
    app.add_middleware(BodyLimit, max_bytes=int(config.max_upload_mb * 1024 * 1024), timeout_s=config.body_timeout_s)
    app.add_middleware(InternalErrors)
    app.add_middleware(HostOrigin, hosts=served_hosts(config, keyed),
                       origins=None if keyed else frozenset({config.cors_origin} - {None}))
    app.add_middleware(StatusCounter, metrics=state.metrics)
    if config.cors_origin:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=[config.cors_origin], allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type", "accept", "x-request-id"],
                           expose_headers=["x-request-id"])
    app.add_middleware(RequestId)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_response(request, e.status, e.code, e.message, e.field, e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return first_validation_error(request, e.errors())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(request, e.status_code, codes.get(e.status_code, "http_error"), str(e.detail),
                              headers=getattr(e, "headers", None))

    def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        import hmac
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong API key: send `Authorization: Bearer <key>`",
                           headers={"www-authenticate": "Bearer"})

    if keyed:
        add_docs(app, authorize)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        from .schemas import TASK_PRESETS  # one source of truth for the page's instruction presets
        html = resources.files("engine.server").joinpath("static/index.html").read_text(encoding="utf-8")
        runner = state.runner  # the page's form follows the model: /v1/generate, or /v1/edit for InstructPix2Pix
        config = {"task": runner.task if runner is not None else "generate",
                  "adapter": runner.kind if runner is not None else None}
        return html.replace("{{TASK_PRESETS}}", json.dumps(TASK_PRESETS).replace("<", "\\u003c")).replace(
            "{{PAGE_CONFIG}}", json.dumps(config).replace("<", "\\u003c"))

    @app.get("/health", summary="the process is alive")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", summary="weights loaded, warmed up and not draining (503 otherwise)")
    async def ready():
        body = {"ready": state.ready, "draining": state.draining, "error": state.failed,
                "ready_after_s": state.ready_s,
                "fast_path": state.pipe.fast_path_report() if state.runner is not None else None}
        return JSONResponse(body, status_code=200 if state.ready else 503)

    @app.get("/metrics", summary="Prometheus text format")
    async def metrics():
        if state.runner is not None:
            state.metrics.fast_path(state.pipe.fast_path_report())
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/models", response_model=ModelList, dependencies=[Depends(authorize)])
    async def models():
        if state.runner is None:
            raise ApiError(503, "unavailable", "the model is still loading", headers={"retry-after": RETRY_AFTER_S})
        return {"object": "list", "data": [state.runner.describe(config)]}

    errors = {str(s): {"model": ErrorResponse} for s in (401, 404, 413, 422, 429, 500, 503, 504)}

    def body_schema(model) -> dict:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schema.pop("$defs", None)
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema},
                                                              "multipart/form-data": {"schema": {"type": "object"}}}}}

    @app.post("/v1/generate", response_model=GenerateResponse, dependencies=[Depends(authorize)], responses={
        **errors, 200: {"content": {"image/png": {}, "text/event-stream": {}}}},
        openapi_extra=body_schema(GenerateRequest))
    async def generate(request: Request):
        """One request of `Pipeline.__call__`. JSON (image as base64 or a data URL) or multipart/form-data (image as
        a file part). `Accept: image/png` with one image answers the PNG; `stream: true` or
        `Accept: text/event-stream` answers server-sent events (`progress`, then `result` or `error`)."""
        return await handle(request, "generate", GenerateRequest, ("image", "control_image", "adapter_mask"))

    @app.post("/v1/edit", response_model=GenerateResponse, dependencies=[Depends(authorize)], responses={
        **errors, 200: {"content": {"image/png": {}, "text/event-stream": {}}}}, openapi_extra=body_schema(EditRequest))
    async def edit(request: Request):
        """One request of `EditPipeline.__call__` (InstructPix2Pix; the server must have loaded an IP2P model):
        `image` is the photo to edit, `adapter_image` the reference an adapter reads. The same bodies, answers
        and errors as /v1/generate."""
        return await handle(request, "edit", EditRequest, ("image", "adapter_image"))

    async def handle(request: Request, task: str, model, image_fields: tuple[str, ...]):
        if not state.ready:
            why = "shutting down" if state.draining else ("failed to load: " + state.failed if state.failed
                                                          else "still loading")
            wait = state.batcher.retry_after_s() if state.draining and state.batcher is not None else RETRY_AFTER_S
            raise ApiError(503, "unavailable", f"the server is {why}", headers={"retry-after": wait})
        if state.runner.task != task:
            other = "an InstructPix2Pix model: POST /v1/edit" if state.runner.task == "edit" else \
                "a text-to-image model: POST /v1/generate"
            raise ApiError(404, "wrong_task", f"this server has loaded {other}")
        req, files = await read_body(request, config.max_upload_mb, model, image_fields)
        deadline = time.monotonic() + config.request_timeout_s  # from its arrival: decode waits count too
        images = await decode_all(files, state.runner.uses(req), state.decode_budget, config.max_pixels,
                                  int(config.max_upload_mb * 2**20), deadline)
        try:
            work = state.runner.prepare(req, images) if task == "edit" else \
                state.runner.prepare(req, images.get("image"), images.get("control_image"), images.get("adapter_mask"))
        except FieldError as e:
            raise ApiError(422, "invalid_request", str(e), e.field) from None
        rows = work.rows
        if rows > config.max_batch_rows:
            raise ApiError(422, "invalid_request", f"this request needs {rows} UNet rows (guidance branches x "
                           f"num_images), over --max-batch-rows {config.max_batch_rows}", "num_images")
        rid = request.scope["state"]["request_id"]
        stream = req.stream or "text/event-stream" in request.headers.get("accept", "")
        events: asyncio.Queue | None = asyncio.Queue() if stream else None
        progress = None if events is None else progress_to(events, asyncio.get_running_loop())
        job = Job(work, state.runner.key(work), rows, deadline, progress)
        try:
            state.batcher.submit(job)
        except QueueFull as e:
            raise ApiError(429, "queue_full", str(e), headers={"retry-after": state.batcher.retry_after_s()}) from None
        except Draining as e:
            raise ApiError(503, "unavailable", str(e), headers={"retry-after": state.batcher.retry_after_s()}) from None
        if events is not None:
            return StreamingResponse(stream_events(job, events, rid), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache"})
        result = await wait_for(job, request)
        if request.headers.get("accept", "").startswith("image/png") and len(result["images"]) == 1:
            png = await run_in_threadpool(encode_png, result["images"][0])
            return Response(png, media_type="image/png", headers={"x-seed": str(req.seed)})
        return await run_in_threadpool(response_body, job, result, rid)

    async def wait_for(job: Job, request: Request):
        """The job's result. While it is queued: dropped if the client goes away, 504 past its deadline."""
        while True:
            done, _ = await asyncio.wait({job.future}, timeout=POLL_S)
            if done:
                return outcome(job, request.scope["state"]["request_id"])
            if job.started is not None and getattr(state.batcher, "mid_flight", False):
                # step-level batching: a running request leaves the batch at the next step when its client goes
                # (its deadline no longer applies: it finishes)
                if await request.is_disconnected() and state.batcher.withdraw(job):
                    log.info("client went away: request %s leaves the running batch", job.id)
                    raise ApiError(499, "client_closed", "client closed the request")
            elif job.started is None:
                if time.monotonic() >= job.deadline and state.batcher.withdraw(job):
                    raise ApiError(504, "deadline_exceeded", f"still queued after --request-timeout-s "
                                   f"{config.request_timeout_s:g} s; it was dropped before compute")
                if await request.is_disconnected() and state.batcher.withdraw(job):
                    log.info("client went away: request %s dropped from the queue", job.id)
                    raise ApiError(499, "client_closed", "client closed the request")

    async def stream_events(job: Job, events: asyncio.Queue, rid: str):
        try:
            yield sse("queued", {"request_id": rid, "queue_depth": len(state.batcher.queue)})
            while not job.future.done():
                getter = asyncio.ensure_future(events.get())
                timeout = max(0.0, job.deadline - time.monotonic()) if job.started is None else None
                done, _ = await asyncio.wait({getter, job.future}, timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield sse(*getter.result())
                else:
                    getter.cancel()
                    if not done and state.batcher.withdraw(job):
                        raise ApiError(504, "deadline_exceeded", "still queued after --request-timeout-s; dropped")
            while not events.empty():
                yield sse(*events.get_nowait())
            result = outcome(job, rid)
            yield sse("result", await run_in_threadpool(response_body, job, result, rid))
        except ApiError as e:
            yield sse("error", error_body(e.code, e.message, rid, e.field) | {"status": e.status})
        finally:  # the client went away (the generator is closed): a queued job leaves the queue
            state.batcher.withdraw(job)

    def outcome(job: Job, rid: str):
        try:
            return job.future.result()
        except DeadlineExceeded as e:
            raise ApiError(504, "deadline_exceeded", str(e)) from None
        except Cancelled as e:
            raise ApiError(499, "client_closed", str(e)) from None
        except Draining as e:
            raise ApiError(503, "unavailable", str(e)) from None
        except FieldError as e:
            raise ApiError(422, "invalid_request", str(e), e.field) from None
        except EngineError as e:
            raise ApiError(422, "invalid_request", str(e)) from None
        except Exception as e:
            log.error("request %s failed in the model", rid, exc_info=e)
            raise ApiError(500, "internal", internal_message(rid)) from None

    return app


def first_validation_error(request: Request, errors: list[dict]):
    try:
        raise_first(errors)
    except ApiError as e:
        return error_response(request, e.status, e.code, e.message, e.field)


def progress_to(events: asyncio.Queue, loop):
    def progress(step: int, total: int) -> None:  # called on the worker thread
        loop.call_soon_threadsafe(events.put_nowait, ("progress", {"step": step, "total": total}))
    return progress


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def encode_png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def response_body(job: Job, result: dict, rid: str) -> dict:
    queue_ms = ((job.started or job.enqueued) - job.enqueued) * 1e3
    timings = {"queue_ms": round(queue_ms, 3), **result["timings"], "batch_requests": job.batch_requests,
               "batch_rows": job.batch_rows}
    images = [base64.b64encode(encode_png(im)).decode() for im in result["images"]]
    return {"images": images, "seed": job.payload.req.seed, "timings": timings, "request_id": rid}
