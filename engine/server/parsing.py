"""Request bodies: JSON or multipart/form-data -> a validated request model plus its images' bytes.
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
    req, files = await read_body(request, max_upload_mb, GenerateRequest, ("image",))
    return req, files.get("image")


async def read_body(request: Request, max_upload_mb: float, model, image_fields: tuple[str, ...]):
    """The body validated as `model`, and {field: bytes} of the images in `image_fields` that came (a file part of
    a multipart body, or base64 in the field); ApiError 4xx."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        fields, files = await read_form(request, max_upload_mb, image_fields)
    elif ctype.startswith("application/json") or not ctype:
        body = await request.body()
        try:
            fields = json.loads(body)
        except ValueError as e:
            raise ApiError(422, "invalid_json", f"body is not valid JSON: {e}") from None
        if not isinstance(fields, dict):
            raise ApiError(422, "invalid_json", "body must be a JSON object")
        files = {}
    else:
        raise ApiError(415, "unsupported_media_type",
                       f"content type {ctype!r}: send application/json or multipart/form-data")
    try:
        req = model.model_validate(fields)
    except ValidationError as e:
        raise_first(e.errors())
    for name in image_fields:
        if name not in files and getattr(req, name, None) is not None:
            try:
                files[name] = from_base64(getattr(req, name))
            except ImageRejected as e:
                raise ApiError(e.status, e.code, str(e), name) from None
    return req, files


async def read_form(request: Request, max_upload_mb: float, image_fields=("image",)) -> tuple[dict, dict]:
    form = await request.form(max_part_size=int(max_upload_mb * 2**20))
    fields, files = {}, {}
    for name, value in form.multi_items():
        if hasattr(value, "read"):  # an UploadFile
            if name not in image_fields:
                only = " and ".join(f"`{f}`" for f in image_fields)
                raise ApiError(422, "invalid_request", f"unexpected file part {name!r}: only {only} "
                               f"{'is a file' if len(image_fields) == 1 else 'are files'}", name)
            files[name] = await value.read()
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
    return fields, files


def raise_first(errors: list[dict]):
    err = errors[0]
    field = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",)) or None
    if field and field.startswith("scale."):
        field = "scale"
    msg = f"{field}: {err.get('msg')}" if field else err.get("msg", "invalid request")
    raise ApiError(422, "invalid_request", msg, field)
