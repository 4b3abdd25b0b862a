"""What `python -m bench serve` runs: its configuration, the servers it knows, the requests it sends (their
shapes by index, `MIXES`), and its one error type."""
from __future__ import annotations

import base64
import io
import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from ipadapter_instruct.bench.e2e_config import INSTRUCT, NEGATIVE, PROMPT

SERVERS = ("engine", "engine-step", "engine-single", "diffusers")
IMAGE_SIZE = {"tiny": 64, "sd15": 512}   # the condition image: the preset's native size


class ServeBenchError(Exception):
    """A server that did not start (exit 1), or arguments that cannot run (exit 2); one line for the CLI."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class ServeConfig:
    preset: str = "tiny"
    concurrency: tuple[int, ...] = (1, 4, 8, 16)
    requests: int = 32            # per server and concurrency level
    steps: int = 10
    url: str | None = None        # an already running server (loopback only) instead of starting the three
    servers: tuple[str, ...] = SERVERS
    duration_s: float | None = None  # soak: the engine server alone at the highest concurrency for this long
    timeout_s: float = 120.0      # per request, retries included
    max_batch_rows: int = 16      # the `engine` and `engine-step` servers' batching; `engine-single` gets 2
    max_wait_ms: float = 10.0
    guidance_scale: float = 6.0
    arrival: str = "closed"       # closed: --concurrency workers; poisson: open-loop arrivals (serve_open.py)
    rates: tuple[float, ...] = ()  # poisson: requests/s; empty: `--rates auto`, `loads` x the measured capacity
    loads: tuple[float, ...] = (0.5, 0.9, 1.2)
    mix: str = "same"             # the requests' shapes by index (MIXES), the same sequence for every server
    seed: int = 0                 # the arrival times' random generator
    cuda_graphs: bool = False     # the engine servers replay their UNet steps from CUDA graphs (serve --cuda-graphs)
    hostile: float | None = None  # this share of the requests hostile: does a good image change? (serve_hostile.py)


# (steps factor, guidance mode) by request index, cycled: `same` is every request at --steps with simple guidance;
# `mixed` has full guidance (4 UNet rows) and half and double step counts among them, as real traffic would
MIXES = {"same": ((1.0, "simple"),),
         "mixed": ((1.0, "simple"), (1.0, "full"), (0.5, "simple"), (2.0, "simple"))}


def request_body(i: int, cfg: ServeConfig, image_b64: str) -> dict:
    """The i-th request of a level: its own seed, and its steps and guidance mode from the mix."""
    factor, mode = MIXES[cfg.mix][i % len(MIXES[cfg.mix])]
    return dict(prompt=PROMPT, negative_prompt=NEGATIVE, image=image_b64, instruct=INSTRUCT, scale=0.8,
                guidance_scale=cfg.guidance_scale, guidance_mode=mode,
                num_inference_steps=max(1, round(cfg.steps * factor)), seed=i, num_images=1)


def condition_image_b64(preset: str) -> str:
    from ipadapter_instruct.engine.demo import draw_condition_image  # deferred: engine.demo imports torch

    buf = io.BytesIO()
    draw_condition_image(IMAGE_SIZE.get(preset, 256)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def loopback_url(text: str) -> str:
    """`text` if it is an http URL on this machine (127.0.0.0/8, localhost, [::1]); ValueError otherwise."""
    parts = urlsplit(text)
    host = parts.hostname or ""
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if parts.scheme not in ("http", "https") or not local:
        raise ValueError(f"not an http URL on this machine (127.0.0.0/8, localhost or [::1]), got {text!r}")
    return text.rstrip("/")
