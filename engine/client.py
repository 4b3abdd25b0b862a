"""Python client of `python -m engine serve`: the same argument names as `Pipeline.__call__`, one request a call.

    from ipadapter_instruct.engine.client import Client
    images = Client("http://127.0.0.1:8000").generate(prompt="a lighthouse", image="cond.png",
                                                      instruct="use the style of this image", seed=0)
    edited = Client(url).edit("make it winter", image="photo.png", seed=0)   # an InstructPix2Pix server

Images go as PIL images or paths, read on the client side (the server never reads a path). `AsyncClient` is the
async twin. A non-2xx answer raises `ServerError` (an `EngineError`) with the server's status, code and field.
"""
from __future__ import annotations

import base64
import io
import os

import httpx
from PIL import Image

from ipadapter_instruct.engine.errors import EngineError

FIELDS = ("prompt", "negative_prompt", "instruct", "scale", "guidance_scale", "instruct_guidance_scale",
          "image_guidance_scale", "guidance_mode", "num_inference_steps", "seed", "height", "width", "scheduler")
EDIT_FIELDS = ("prompt", "negative_prompt", "adapter_image", "instruct", "scale", "guidance_scale",
               "image_guidance_scale", "num_inference_steps", "seed", "height", "width", "scheduler")


class ServerError(EngineError):
    def __init__(self, status: int, code: str, message: str, field: str | None = None, request_id: str | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.field, self.request_id = status, code, field, request_id


def encode_image(image) -> str:
    """A PIL image or a path -> base64 of its file bytes (PIL images as PNG)."""
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
    elif isinstance(image, (str, os.PathLike)):
        try:
            with open(image, "rb") as fh:
                data = fh.read()
        except OSError as e:
            raise EngineError(f"cannot read condition image {os.fspath(image)}: {e.strerror}") from None
    else:
        raise EngineError(f"image must be a PIL image or a path, got {type(image).__name__}")
    return base64.b64encode(data).decode()


def build_body(image=None, num_images_per_prompt: int = 1, fields=None, **kwargs) -> dict:
    fields = fields or FIELDS
    unknown = set(kwargs) - set(fields)
    if unknown:
        raise TypeError(f"unknown argument(s) {', '.join(sorted(unknown))}; the server takes {', '.join(fields)}")
    body = {k: v for k, v in kwargs.items() if v is not None}
    body["num_images"] = num_images_per_prompt
    if image is not None:
        body["image"] = encode_image(image)
    if body.get("adapter_image") is not None:
        body["adapter_image"] = encode_image(body["adapter_image"])
    return body


def edit_body(prompt, image, negative_prompt, num_images_per_prompt, kwargs) -> dict:
    return build_body(image, num_images_per_prompt, EDIT_FIELDS, prompt=prompt, negative_prompt=negative_prompt,
                      **kwargs)


def parse(response: httpx.Response) -> dict:
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.status_code >= 400:
        err = (data or {}).get("error") or {}
        raise ServerError(response.status_code, err.get("code", "http_error"), err.get("message", response.text[:200]),
                          err.get("field"), (data or {}).get("request_id"))
    return data


def decode_images(result: dict) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for b in result["images"]]


class _Base:
    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 300.0):
        self.url = url.rstrip("/")
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.last_result: dict | None = None   # the last answer (seed, timings, request_id); with threads, any one


class Client(_Base):
    def generate(self, prompt=None, image=None, instruct=None, negative_prompt=None, *,
                 num_images_per_prompt: int = 1, **kwargs) -> list[Image.Image]:
        """One request; None leaves a field to the server's default. -> PIL images."""
        body = build_body(image, num_images_per_prompt, prompt=prompt, instruct=instruct,
                          negative_prompt=negative_prompt, **kwargs)
        with httpx.Client(timeout=self.timeout) as http:
            result = parse(http.post(self.url + "/v1/generate", json=body, headers=self.headers))
        self.last_result = result
        return decode_images(result)

    def edit(self, prompt, image, negative_prompt=None, *, num_images_per_prompt: int = 1,
             **kwargs) -> list[Image.Image]:
        """One InstructPix2Pix edit (POST /v1/edit; EditPipeline's argument names). -> PIL images."""
        body = edit_body(prompt, image, negative_prompt, num_images_per_prompt, kwargs)
        with httpx.Client(timeout=self.timeout) as http:
            result = parse(http.post(self.url + "/v1/edit", json=body, headers=self.headers))
        self.last_result = result
        return decode_images(result)

    def ready(self) -> bool:
        return httpx.get(self.url + "/ready", timeout=self.timeout).status_code == 200

    def models(self) -> dict:
        return parse(httpx.get(self.url + "/v1/models", headers=self.headers, timeout=self.timeout))


class AsyncClient(_Base):
    async def generate(self, prompt=None, image=None, instruct=None, negative_prompt=None, *,
                       num_images_per_prompt: int = 1, **kwargs) -> list[Image.Image]:
        body = build_body(image, num_images_per_prompt, prompt=prompt, instruct=instruct,
                          negative_prompt=negative_prompt, **kwargs)
        async with httpx.AsyncClient(timeout=self.timeout) as http:
            result = parse(await http.post(self.url + "/v1/generate", json=body, headers=self.headers))
        self.last_result = result
        return decode_images(result)

    async def edit(self, prompt, image, negative_prompt=None, *, num_images_per_prompt: int = 1,
                   **kwargs) -> list[Image.Image]:
        body = edit_body(prompt, image, negative_prompt, num_images_per_prompt, kwargs)
        async with httpx.AsyncClient(timeout=self.timeout) as http:
            result = parse(await http.post(self.url + "/v1/edit", json=body, headers=self.headers))
        self.last_result = result
        return decode_images(result)

    async def ready(self) -> bool:
        async with httpx.AsyncClient(timeout=self.timeout) as http:
            return (await http.get(self.url + "/ready")).status_code == 200

    async def models(self) -> dict:
        async with httpx.AsyncClient(timeout=self.timeout) as http:
            return parse(await http.get(self.url + "/v1/models", headers=self.headers))
