"""What the routes answer: a finished job's outcome (its result, or the ApiError its failure maps to), the JSON body
with base64 PNGs, seeds and timings, a lone PNG, and JSON errors. Every PNG carries its generation parameters in
Automatic1111's "parameters" text chunk (engine/pnginfo.py)."""
from __future__ import annotations

import base64
import logging

from fastapi import Request
from fastapi.responses import JSONResponse

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.pnginfo import png_bytes
from ipadapter_instruct.engine.server.batcher import DeadlineExceeded, Draining, Job
from ipadapter_instruct.engine.server.errors import ApiError, error_body, internal_message
from ipadapter_instruct.engine.server.parsing import raise_first
from ipadapter_instruct.engine.server.stepper import Cancelled
from ipadapter_instruct.engine.server.runners import FieldError

log = logging.getLogger("ipadapter_instruct.engine.server")


def outcome(job: Job, rid: str) -> dict:
    """A done job's result; its failure as the ApiError the client gets."""
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


def encode_png(result: dict, j: int) -> bytes:
    """Image j of a result as PNG bytes, its parameters (prompt, seed, steps, ...) in the "parameters" chunk."""
    return png_bytes(result["images"][j], result["params"][j])


def response_body(job: Job, result: dict, rid: str) -> dict:
    queue_ms = ((job.started or job.enqueued) - job.enqueued) * 1e3
    timings = {"queue_ms": round(queue_ms, 3), **result["timings"], "batch_requests": job.batch_requests,
               "batch_rows": job.batch_rows}
    images = [base64.b64encode(encode_png(result, j)).decode() for j in range(len(result["images"]))]
    return {"images": images, "seed": job.payload.req.seed, "seeds": result["seeds"], "timings": timings,
            "request_id": rid}


def error_response(request: Request, status: int, code: str, message: str, field=None, headers=None):
    rid = request.scope.get("state", {}).get("request_id")
    return JSONResponse(error_body(code, message, rid, field), status_code=status, headers=headers)


def first_validation_error(request: Request, errors: list[dict]):
    try:
        raise_first(errors)
    except ApiError as e:
        return error_response(request, e.status, e.code, e.message, e.field)
