"""The server's knobs: one frozen dataclass whose field names are the CLI flags (`--max-batch-rows` is
`max_batch_rows`), as Triton Inference Server's model config names its batcher's knobs."""
from __future__ import annotations

from dataclasses import dataclass

from ipadapter_instruct.engine.registry import EngineConfig


@dataclass(frozen=True)
class ServerConfig(EngineConfig):
    """EngineConfig (what loading takes: model, adapter, device, LoRA, compile, CUDA graphs ...) and the server's own
    knobs. `adapter` is one file here (without it the server is text to image); `controlnet` one folder."""
    host: str = "127.0.0.1"
    port: int = 8000
    batching: str = "request"             # request: calls of whole requests; step: requests join at the next step
    max_batch_rows: int = 16              # UNet rows in one call: requests x guidance branches x images
    max_wait_ms: float = 10.0             # how long the oldest waiting request waits for company
    max_queue: int = 64                   # waiting requests; one more is answered 429
    request_timeout_s: float = 120.0      # a request still queued after this is dropped (504); a running one finishes
    max_upload_mb: float = 20.0           # request body (and so the image in it); more is 413
    max_pixels: int = 16_777_216          # any request image's width x height; more is 413
    max_size: int | None = None           # an output's largest side in pixels; more is 422 (None: native x 4)
    max_decode_pixels: int = 67_108_864   # pixels being decoded at once over all requests; more wait their turn
    header_timeout_s: float = 10.0        # a connection's request headers must arrive within this; else closed
    body_timeout_s: float = 60.0          # a request's body must arrive within this after its headers; else 408
    api_key_file: str | None = None       # with it, /v1/* needs `Authorization: Bearer <key>`
    cache_size: int = 256                 # entries in each conditioning cache (images, texts); 0 turns it off
    cors_origin: str | None = None        # one allowed origin; CORS is off without it
    allowed_hosts: str | None = None      # Host names served, comma separated (* any); default: the bound host's
    warmup: bool = True                   # one 1-step request before /ready turns true
    default_instruct: str = "use everything from this image"  # an A1111 IP-Adapter unit's, when it sends none

    def api_key(self) -> str | None:
        if self.api_key_file is None:
            return None
        with open(self.api_key_file, encoding="utf-8") as fh:
            key = fh.read().strip()
        if not key:
            raise ValueError(f"API key file {self.api_key_file} is empty")
        return key
