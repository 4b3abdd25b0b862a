"""Request bodies: JSON or multipart/form-data -> a validated request model plus its images' bytes.
Every problem is an ApiError (422 naming the field, or `body` for a malformed or too deeply nested body; 415 for
a content type other than application/json or multipart/form-data, parameters such as charset aside)."""
from __future__ import annotations

import json

from fastapi import Request
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from ipadapter_instruct.engine.server.errors import ApiError
from ipadapter_instruct.engine.server.images import ImageRejected, from_base64
from ipadapter_instruct.engine.server.schemas import EDIT_ALIASES, GENERATE_ALIASES, EditRequest, GenerateRequest

MAX_DEPTH = 8  # nested JSON levels: a body {..} holding a per-block scale {"up": {"block_0": [..]}} is 4
ALIASES = {GenerateRequest: GENERATE_ALIASES, EditRequest: EDIT_ALIASES}  # each body's old field names


async def read_request(request: Request, max_upload_mb: float) -> tuple[GenerateRequest, bytes | None]:
    """The body as a validated GenerateRequest and the reference image's bytes (None without one); ApiError 4xx."""
    req, files = await read_body(request, max_upload_mb, GenerateRequest, ("ip_adapter_image",))
    return req, files.get("ip_adapter_image")


async def read_body(request: Request, max_upload_mb: float, model, image_fields: tuple[str, ...]):
    """The body validated as `model`, and {field: bytes} of the images in `image_fields` that came (a file part of
    a multipart body, or base64 in the field; a file part may come under a field's old name); ApiError 4xx."""
    ctype = request.headers.get("content-type", "")
    media = ctype.split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        aliases = {old: new for old, new in ALIASES.get(model, {}).items() if new in image_fields}
        fields, files = await read_form(request, max_upload_mb, (*image_fields, *aliases))
        files = renamed_files(files, fields, aliases)
    elif media == "application/json":
        fields = parse_json(await request.body(), "body")
        if not isinstance(fields, dict):
            raise ApiError(422, "invalid_json", "body must be a JSON object", "body")
        files = {}
    else:
        raise ApiError(415, "unsupported_media_type", f"content type {ctype!r}: send application/json or "
                       f"multipart/form-data", "content-type")
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


def renamed_files(files: dict, fields: dict, aliases: dict) -> dict:
    """File parts under an image field's old name as the new one; the two names at once: a 422 naming the new."""
    for old, new in aliases.items():
        if old in files and (new in files or new in fields) or new in files and old in fields:
            raise ApiError(422, "invalid_request", f"{new}: give {new} or its old name {old}, not both", new)
    return {aliases.get(k, k): v for k, v in files.items()}


def parse_json(text, field: str):
    """JSON text as Python values, at most MAX_DEPTH levels deep; ApiError 422 naming `field` otherwise."""
    nested = ApiError(422, "invalid_json", f"{field} is nested more than {MAX_DEPTH} levels deep", field)
    try:
        value = json.loads(text)
    except RecursionError:  # past the decoder's own limit (about a thousand levels), before any Python object
        raise nested from None
    except ValueError as e:
        raise ApiError(422, "invalid_json", f"{field} is not valid JSON: {e}", field) from None
    if depth(value) > MAX_DEPTH:
        raise nested
    return value


def depth(value) -> int:
    """Levels of lists and objects (a scalar is 0), counted breadth first up to MAX_DEPTH + 1."""
    level, frontier = 0, [value]
    while level <= MAX_DEPTH:
        containers = [x for x in frontier if isinstance(x, (list, dict))]
        if not containers:
            break
        level += 1
        frontier = [v for x in containers for v in (x.values() if isinstance(x, dict) else x)]
    return level


async def read_form(request: Request, max_upload_mb: float, image_fields=("image",)) -> tuple[dict, dict]:
    try:
        form = await request.form(max_part_size=int(max_upload_mb * 2**20))
    except HTTPException as e:  # Starlette's word for a malformed multipart body
        raise ApiError(422, "invalid_multipart", f"malformed multipart body: {e.detail}", "body") from None
    fields, files = {}, {}
    for name, value in form.multi_items():
        if hasattr(value, "read"):  # an UploadFile
            if name not in image_fields:
                only = " and ".join(f"`{f}`" for f in image_fields)
                raise ApiError(422, "invalid_request", f"unexpected file part {name!r}: only {only} "
                               f"{'is a file' if len(image_fields) == 1 else 'are files'}", name)
            files[name] = await value.read()
        elif name == "scale" and value.strip().startswith("{"):
            fields[name] = parse_json(value, "scale")
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
