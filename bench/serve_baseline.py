"""The baseline server of `python -m bench serve`: diffusers' own StableDiffusionPipeline with its IP-Adapter+
support (`load_ip_adapter`), behind a minimal FastAPI app that takes the engine's JSON request and answers its
response shape (images as base64 PNG), one request at a time: what one would write around diffusers without a
batcher.

    python -m bench.serve_baseline --model DIR --image-encoder DIR --plus-adapter FILE [--host 127.0.0.1] [--port 0]

Loads the weights, runs one 1-step warm-up request (as the engine does before /ready), then prints
`ready: URL` and serves until SIGTERM. Device and dtype follow the engine's rule: cuda with float16 when a GPU is
present, else cpu with float32. Every torch call (loading, warm-up, requests) runs on one worker thread: on the
CPU, each thread that runs torch ops keeps its own OpenMP thread team, and two teams on few cores slow every op.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import socket
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from ipadapter_instruct.engine import DEFAULT_NEGATIVE, DEFAULT_PROMPT

WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffusers-worker")  # the one thread that runs torch


class BaselineRequest(BaseModel):
    """The engine's GenerateRequest fields that diffusers' IP-Adapter+ pipeline can honour."""
    model_config = ConfigDict(extra="forbid")

    prompt: str = DEFAULT_PROMPT
    negative_prompt: str = DEFAULT_NEGATIVE
    image: str = Field(description="condition image: base64 PNG, JPEG or WebP")
    instruct: Optional[str] = Field(None, description="accepted and unused: IP-Adapter+ reads no instruction")
    scale: float = 0.8
    guidance_scale: float = 6.0
    guidance_mode: Literal["auto", "simple"] = "auto"  # diffusers' CFG: the engine's `simple` (2 UNet rows)
    num_inference_steps: int = Field(30, ge=1, le=250)
    seed: int = Field(0, ge=0, lt=2**63)
    height: Optional[int] = Field(None, ge=8)
    width: Optional[int] = Field(None, ge=8)
    num_images: int = Field(1, ge=1, le=8)
    scheduler: Literal["default"] = "default"


class Baseline:
    """The diffusers pipeline and the lock that makes it serve one request at a time. Build it on `WORKER`."""

    def __init__(self, model: str, image_encoder: str, plus_adapter: str):
        import torch

        from ipadapter_instruct.bench.common import quiet_loaders
        from ipadapter_instruct.bench.e2e_config import E2EConfig
        from ipadapter_instruct.bench.e2e_providers import DiffusersProvider

        quiet_loaders()
        self.torch = torch
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if cuda else "cpu")
        dtype = torch.float16 if cuda else torch.float32
        paths = dict(model=model, image_encoder=image_encoder, plus_adapter=plus_adapter)
        self.pipe = DiffusersProvider(paths, self.device, dtype, E2EConfig()).pipe  # the e2e benchmark's loading
        self.lock = asyncio.Lock()

    def __call__(self, req: BaselineRequest, image) -> list:
        # one request on the calling (worker) thread -> PIL images
        self.pipe.set_ip_adapter_scale(req.scale)
        gen = self.torch.Generator("cpu").manual_seed(req.seed)
        return self.pipe(prompt=req.prompt, negative_prompt=req.negative_prompt, ip_adapter_image=image,
                         guidance_scale=req.guidance_scale, num_inference_steps=req.num_inference_steps,
                         height=req.height, width=req.width, num_images_per_prompt=req.num_images,
                         generator=gen).images


def png_base64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def create_app(baseline: Baseline):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from PIL import Image

    app = FastAPI(title="diffusers baseline")

    def error(status: int, code: str, message: str, field=None):
        rid = uuid.uuid4().hex
        return JSONResponse({"error": {"code": code, "message": message, "field": field}, "request_id": rid},
                            status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, e: RequestValidationError):
        err = e.errors()[0]
        field = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or None
        return error(422, "invalid_request", f"{field}: {err.get('msg')}", field)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        return {"ready": True}

    @app.post("/v1/generate")
    async def generate(req: BaselineRequest):
        try:
            data = base64.b64decode(req.image.split(",", 1)[-1], validate=True)
            image = Image.open(io.BytesIO(data)).convert("RGB")
        except Exception as e:  # not base64, not an image
            return error(422, "invalid_request", f"image: not a base64 PNG, JPEG or WebP ({type(e).__name__})",
                         "image")
        t0 = time.perf_counter()
        async with baseline.lock:  # one request at a time; the others wait here
            t1 = time.perf_counter()
            images = await asyncio.get_running_loop().run_in_executor(WORKER, baseline, req, image)
            t2 = time.perf_counter()
        encoded = await asyncio.to_thread(lambda: [png_base64(im) for im in images])
        timings = {"queue_ms": (t1 - t0) * 1e3, "compute_ms": (t2 - t1) * 1e3, "batch_requests": 1,
                   "batch_rows": 2 * req.num_images}
        return {"images": encoded, "seed": req.seed, "timings": timings, "request_id": uuid.uuid4().hex}

    return app


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve_baseline", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="diffusers SD1.5 folder")
    p.add_argument("--image-encoder", required=True, help="CLIPVisionModelWithProjection folder")
    p.add_argument("--plus-adapter", required=True, help="IP-Adapter+ file of the same base")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (the ready line says which)")
    a = p.parse_args(argv)
    import signal

    import uvicorn
    from PIL import Image

    # uvicorn stops gracefully on SIGTERM and then re-raises it to the handler it found: exit 0, as the engine
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    baseline = WORKER.submit(Baseline, a.model, a.image_encoder, a.plus_adapter).result()
    gray = Image.new("RGB", (64, 64), (127, 127, 127))
    WORKER.submit(baseline, BaselineRequest(image="", num_inference_steps=1), gray).result()  # warm-up
    sock = socket.socket(socket.AF_INET6 if ":" in a.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((a.host, a.port))
    sock.listen(128)  # connections queue from here on, so the ready line is true before uvicorn's loop runs
    host, port = sock.getsockname()[:2]
    print(f"ready: http://{'[' + host + ']' if ':' in host else host}:{port} (diffusers {baseline.device}, "
          "one request at a time)", flush=True)
    uvicorn.Server(uvicorn.Config(create_app(baseline), log_level="warning", access_log=False)).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
