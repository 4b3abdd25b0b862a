"""What one call carries from its requests to its images, apart from the pipeline: a pipeline holds models and
settings only, so several calls (threads, the server's runners, step-level flights) run on one pipeline at once.

`CallState` is what a call gathers while it prepares (its stage timings, an edit's photo latents, SDXL's size
conditioning and pooled text embeddings); `Prepared` is everything the denoising loop reads, made once per call
(`Pipeline._prepare`) and held by step-level batching's flights (engine/stepping.py).
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ipadapter_instruct.engine.errors import EngineError


@dataclass
class CallState:
    """One call's own values while it prepares, never stored on the pipeline."""
    timings: dict = field(default_factory=dict)       # stage -> ms, summed (engine::<stage> ranges in a profiler)
    photo_latents: torch.Tensor | None = None          # InstructPix2Pix: (requests, 4, h, w), the photos' latents
    size_conditioning: tuple = (None, (0, 0), None)    # SDXL: (original_size, crops_coords_top_left, target_size)
    pooled: dict = field(default_factory=dict)         # SDXL: text -> the second encoder's pooled projection

    @contextmanager
    def timed(self, key: str, device: torch.device):
        # wall time into self.timings, and a named range ("engine::projector", ...) in any running torch profiler
        with torch.profiler.record_function("engine::" + key.removesuffix("_ms")):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            yield
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.timings[key] = self.timings.get(key, 0.0) + (time.perf_counter() - t0) * 1e3


@dataclass
class Prepared:
    """A call's step-invariant inputs: what `Pipeline._prepare` made once and every denoising step reads."""
    height: int
    width: int
    plan: dict | None            # rows, branches and combination (None in a flight split from a batch)
    text_rows: torch.Tensor      # (rows, 77, text_dim)
    control: object              # engine.controlnet.ControlState or None
    sched: object                # this call's own scheduler, timesteps set
    total: int                   # steps
    latents: torch.Tensor        # (images, C, h, w) initial latents
    latent_of_row: torch.Tensor  # (rows,) which latent each UNet row predicts for
    combine: object              # engine.combine.Combination
    extra: dict                  # the scheduler step's keyword arguments (eta, generator)
    contexts: list               # the adapter context of every step
    added: dict | None = None    # SDXL: {"text_embeds", "time_ids"} per row
    guess_mode: bool = False     # ControlNet guess mode
    call: CallState = field(default_factory=CallState)
    timesteps: object = None     # the timesteps this call runs (a photo's strength skips the first); None: sched's
    keep: object = None          # inpainting on a 4-channel UNet: engine.img2img.Keep, re-imposed after each step
    stepped: int = 0             # steps taken (update counts them: Keep reads the next timestep)

    def __post_init__(self):
        if self.timesteps is None:
            self.timesteps = self.sched.timesteps

    def update(self, eps_rows: torch.Tensor, t, latents: torch.Tensor) -> torch.Tensor:
        """One denoising update: each image's noise prediction from its own rows (guidance), then the scheduler's
        step (and, inpainting on a 4-channel UNet, the kept region put back). eps_rows: (rows, C, h, w) this call's
        UNet output -> the next latents (images, C, h, w)."""
        eps = self.combine(eps_rows).view(latents.shape).to(latents.dtype)
        latents = self.sched.step(eps, t, latents, **self.extra, return_dict=False)[0]
        if self.keep is not None:
            latents = self.keep.apply(latents, self.sched, self.timesteps, self.stepped)
        self.stepped += 1
        return latents


@dataclass
class EditContext:
    """A step's UNet context when the UNet reads more than the latents: the adapter's context, and the channels
    concatenated after the latents per row: InstructPix2Pix's photo latent (zeros for its `neither` branch), or an
    inpainting UNet's mask and masked-photo latent (engine/img2img.py)."""
    adapter: object           # what Pipeline._unet_inputs made (K/V, scales)
    image_rows: torch.Tensor  # (rows, c, h, w): the extra channels per UNet row


def with_channels(x: torch.Tensor, ctx) -> tuple:
    """A step's UNet input and context: the latents with any extra channels of the context concatenated."""
    if isinstance(ctx, EditContext):
        return torch.cat([x, ctx.image_rows.to(x.dtype)], dim=1), ctx.adapter
    return x, ctx


def extra_channels(contexts: list, rows: torch.Tensor) -> list:
    """Every step's context with `rows` beside it (repeated contexts stay one object: step batching packs by
    identity)."""
    made: dict = {}
    for c in contexts:
        made.setdefault(id(c), EditContext(c, rows))
    return [made[id(c)] for c in contexts]


def select_rows(t, index):
    """A per-row entry (a tensor, a tuple of them for several adapters, or None) -> its rows at `index`."""
    if isinstance(t, tuple):
        return tuple(select_rows(x, index) for x in t)
    return None if t is None else t.index_select(0, index)


SIZE_CONDITIONING = ("original_size", "target_size", "crops_coords_top_left")


def size_conditioning(original_size=None, target_size=None, crops_coords_top_left=(0, 0)) -> tuple:
    """SDXL's size conditioning, checked: -> (original_size, crops_coords_top_left, target_size); a size of None is
    the output size."""
    for name, value in (("original_size", original_size), ("target_size", target_size),
                        ("crops_coords_top_left", crops_coords_top_left)):
        if value is not None and (not isinstance(value, (tuple, list)) or len(value) != 2
                                  or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise EngineError(f"{name} must be two integers, got {value!r}")
    return original_size, tuple(crops_coords_top_left or (0, 0)), target_size


class LastTimings(threading.local):
    """`pipe.timings`: the stage timings of the last call made from this thread (a thread's own, so concurrent calls
    from other threads never mix into it)."""
    value: dict

    def __init__(self):
        self.value = {}
