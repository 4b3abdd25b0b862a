"""Request bodies: JSON or multipart/form-data -> a validated `GenerateRequest` plus the condition image's bytes.
Every problem is an ApiError (422 naming the field, 415 for another content type)."""
from __future__ import annotations

import json

from fastapi import Request
from pydantic import ValidationError

from .errors import ApiError
from .images import ImageRejected, from_base64
from .schemas import GenerateRequest


async def read_request(request: Request, max_upload_mb: float) -> tuple[GenerateRequest, bytes | None]:
    """The body as a validated GenerateRequest and the condition image's bytes (None without one); ApiError 4xx."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        fields, data = await read_form(request, max_upload_mb)
    elif ctype.startswith("application/json") or not ctype:
        body = await request.body()
        try:
            fields = json.loads(body)
        except ValueError as e:
            raise ApiError(422, "invalid_json", f"body is not valid JSON: {e}") from None
        if not isinstance(fields, dict):
            raise ApiError(422, "invalid_json", "body must be a JSON object")
        data = None
    else:
        raise ApiError(415, "unsupported_media_type",
                       f"content type {ctype!r}: send application/json or multipart/form-data")
    try:
        req = GenerateRequest.model_validate(fields)
    except ValidationError as e:
        raise_first(e.errors())
    if data is None and req.image is not None:
        try:
            data = from_base64(req.image)
        except ImageRejected as e:
            raise ApiError(e.status, e.code, str(e), "image") from None
    return req, data

async def read_form(request: Request, max_upload_mb: float) -> tuple[dict, bytes | None]:
    form = await request.form(max_part_size=int(max_upload_mb * 2**20))
    fields, data = {}, None
    for name, value in form.multi_items():
        if hasattr(value, "read"):  # an UploadFile
            if name != "image":
                raise ApiError(422, "invalid_request", f"unexpected file part {name!r}: only `image` is a file",
                               name)
            data = await value.read()
        elif name == "scale" and value.strip().startswith("{"):
            try:
                fields[name] = json.loads(value)
            except ValueError:
                raise ApiError(422, "invalid_request", "scale: not a number nor a JSON per-block dict",
                               "scale") from None
        elif name == "stream":
            fields[name] = value.lower() in ("1", "true", "yes", "on")
        else:
            fields[name] = value
    return fields, data


def raise_first(errors: list[dict]):
    err = errors[0]
    field = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",)) or None
    if field and field.startswith("scale."):
        field = "scale"
    msg = f"{field}: {err.get('msg')}" if field else err.get("msg", "invalid request")
    raise ApiError(422, "invalid_request", msg, field)
