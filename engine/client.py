"""Python client of `python -m engine serve`: the same argument names as `Pipeline.__call__`, one request a call.

    from ipadapter_instruct.engine.client import Client
    out = Client("http://127.0.0.1:8000").generate(prompt="a lighthouse", ip_adapter_image="cond.png",
                                                   instruct="use the style of this image")
    out.images, out.seed     # the PIL images and the seed the server drew (send it back to get them again)
    out.seeds                # each image's own seed, seed + j (sent back alone, it gives image j again)
    edited = Client(url).edit("make it winter", image="photo.png", seed=0)   # an InstructPix2Pix server
    Client(url).generate(prompt="a castle", init_image="photo.png", strength=0.6, mask_image="mask.png")  # inpaint

Images go as PIL images or paths, read on the client side (the server never reads a path); a path that cannot be
read raises `ClientError` before any request. The reference image is `ip_adapter_image` (old names, still taken:
`image` on generate, `adapter_image` on edit). `seed=None` (the default) lets the server draw a fresh seed. The
answer is a `Result`: a list of PIL images, with `.images`, `.seed`, `.seeds`, `.timings` and `.request_id`.
`AsyncClient` is the async twin. A non-2xx answer raises `ServerError` with the server's status, code and field.
"""
from __future__ import annotations

import base64
import io
import os

import httpx
from PIL import Image

from ipadapter_instruct.engine.errors import EngineError

FIELDS = ("prompt", "negative_prompt", "ip_adapter_image", "instruct", "scale", "guidance_scale",
          "instruct_guidance_scale", "image_guidance_scale", "guidance_mode", "num_inference_steps", "seed", "height",
          "width", "scheduler", "init_image", "strength", "mask_image")
EDIT_FIELDS = ("prompt", "negative_prompt", "image", "ip_adapter_image", "instruct", "scale", "guidance_scale",
               "image_guidance_scale", "num_inference_steps", "seed", "height", "width", "scheduler")
IMAGE_FIELDS = ("image", "ip_adapter_image", "init_image", "mask_image")


class ClientError(EngineError):
    """A request the client cannot make (an image file that is missing or unreadable, an image of the wrong type);
    raised before anything is sent."""


class ServerError(EngineError):
    def __init__(self, status: int, code: str, message: str, field: str | None = None, request_id: str | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.field, self.request_id = status, code, field, request_id


class Result(list):
    """The answer's images (a list of PIL images, as before) with `.images`, `.seed` (the request's seed: sent
    back, it reproduces these images), `.seeds` (one per image, seed + j: sent back with num_images_per_prompt=1,
    it reproduces image j alone), `.timings` and `.request_id`."""

    def __init__(self, images: list, answer: dict):
        super().__init__(images)
        self.images, self.seed = list(images), answer.get("seed")
        self.seeds = list(answer.get("seeds") or [])
        self.timings, self.request_id = answer.get("timings", {}), answer.get("request_id")


def encode_image(image, field: str = "ip_adapter_image") -> str:
    """A PIL image or a path -> base64 of its file bytes (PIL images as PNG); ClientError naming the path."""
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
    elif isinstance(image, (str, os.PathLike)):
        try:
            with open(image, "rb") as fh:
                data = fh.read()
        except OSError as e:
            raise ClientError(f"{field}: cannot read {os.fspath(image)}: {e.strerror}") from None
    else:
        raise ClientError(f"{field} must be a PIL image or a path, got {type(image).__name__}")
    return base64.b64encode(data).decode()


def aliased(new, old, new_name: str, old_name: str):
    """A value given under its name or its old one (an alias), not both."""
    if new is not None and old is not None:
        raise TypeError(f"give {new_name} or its old name {old_name}, not both")
    return new if new is not None else old


def build_body(num_images_per_prompt: int = 1, fields=None, **kwargs) -> dict:
    fields = fields or FIELDS
    unknown = set(kwargs) - set(fields)
    if unknown:
        raise TypeError(f"unknown argument(s) {', '.join(sorted(unknown))}; the server takes {', '.join(fields)}")
    body = {k: v for k, v in kwargs.items() if v is not None}
    body["num_images_per_prompt"] = num_images_per_prompt
    for name in IMAGE_FIELDS:
        if body.get(name) is not None:
            body[name] = encode_image(body[name], name)
    return body


def generate_body(prompt, ip_adapter_image, instruct, negative_prompt, image, num_images_per_prompt, kwargs) -> dict:
    reference = aliased(ip_adapter_image, image, "ip_adapter_image", "image")
    return build_body(num_images_per_prompt, prompt=prompt, ip_adapter_image=reference, instruct=instruct,
                      negative_prompt=negative_prompt, **kwargs)


def edit_body(prompt, image, negative_prompt, ip_adapter_image, adapter_image, num_images_per_prompt, kwargs) -> dict:
    reference = aliased(ip_adapter_image, adapter_image, "ip_adapter_image", "adapter_image")
    return build_body(num_images_per_prompt, EDIT_FIELDS, prompt=prompt, image=image, negative_prompt=negative_prompt,
                      ip_adapter_image=reference, **kwargs)


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


def decode_images(result: dict) -> Result:
    return Result([Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for b in result["images"]], result)


class _Base:
    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 300.0):
        self.url = url.rstrip("/")
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.last_result: dict | None = None   # the last answer (seed, timings, request_id); with threads, any one


class Client(_Base):
    def generate(self, prompt=None, ip_adapter_image=None, instruct=None, negative_prompt=None, *, image=None,
                 num_images_per_prompt: int = 1, seed=None, **kwargs) -> Result:
        """One request; None leaves a field to the server's default (seed: a fresh one). `image` is the old name of
        `ip_adapter_image`. -> Result: the PIL images, with .seed and .seeds."""
        body = generate_body(prompt, ip_adapter_image, instruct, negative_prompt, image, num_images_per_prompt,
                             dict(kwargs, seed=seed))
        with httpx.Client(timeout=self.timeout) as http:
            result = parse(http.post(self.url + "/v1/generate", json=body, headers=self.headers))
        self.last_result = result
        return decode_images(result)

    def edit(self, prompt, image, negative_prompt=None, *, ip_adapter_image=None, adapter_image=None,
             num_images_per_prompt: int = 1, seed=None, **kwargs) -> Result:
        """One InstructPix2Pix edit (POST /v1/edit; EditPipeline's argument names; `adapter_image` is the old name of
        `ip_adapter_image`). -> Result: the PIL images, with .seed and .seeds."""
        body = edit_body(prompt, image, negative_prompt, ip_adapter_image, adapter_image, num_images_per_prompt,
                         dict(kwargs, seed=seed))
        with httpx.Client(timeout=self.timeout) as http:
            result = parse(http.post(self.url + "/v1/edit", json=body, headers=self.headers))
        self.last_result = result
        return decode_images(result)

    def ready(self) -> bool:
        return httpx.get(self.url + "/ready", timeout=self.timeout).status_code == 200

    def models(self) -> dict:
        return parse(httpx.get(self.url + "/v1/models", headers=self.headers, timeout=self.timeout))


class AsyncClient(_Base):
    async def generate(self, prompt=None, ip_adapter_image=None, instruct=None, negative_prompt=None, *, image=None,
                       num_images_per_prompt: int = 1, seed=None, **kwargs) -> Result:
        body = generate_body(prompt, ip_adapter_image, instruct, negative_prompt, image, num_images_per_prompt,
                             dict(kwargs, seed=seed))
        async with httpx.AsyncClient(timeout=self.timeout) as http:
            result = parse(await http.post(self.url + "/v1/generate", json=body, headers=self.headers))
        self.last_result = result
        return decode_images(result)

    async def edit(self, prompt, image, negative_prompt=None, *, ip_adapter_image=None, adapter_image=None,
                   num_images_per_prompt: int = 1, seed=None, **kwargs) -> Result:
        body = edit_body(prompt, image, negative_prompt, ip_adapter_image, adapter_image, num_images_per_prompt,
                         dict(kwargs, seed=seed))
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
