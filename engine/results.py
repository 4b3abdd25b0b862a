"""What a pipeline call returns, and the seeds behind it.

diffusers' habit, `pipe(...).images`, on what a call has always returned: `PipelineOutput` is the list of PIL
images itself (it indexes, iterates and compares as the list did) and `LatentOutput` the latent tensor itself
(output_type="latent"; its arithmetic gives plain tensors), each with `.images` (itself), `.seeds` (one per image,
request-major) and `.timings` (the call's stage timings, as `pipe.timings` after it).

Seeds: image j of a request with seed s is drawn from its own generator seeded s + j (Automatic1111's rule), so
each image's reported seed gives that image back as a one-image call. A request with no seed draws a fresh one;
one given a generator= reports None (the generator's state is the caller's). With one image per request a seed is
exactly diffusers' `generator=torch.Generator().manual_seed(seed)`.
"""
from __future__ import annotations

import numbers
import secrets

import torch

from ipadapter_instruct.engine.errors import EngineError

SEED_LIMIT = 2 ** 63   # a seed is 0 <= seed < 2**63 (the server's schemas take the same)
DRAWN_LIMIT = 2 ** 32  # a drawn seed is below 2**32: exact in JSON and JavaScript, as Automatic1111's are


def random_seed() -> int:
    """A fresh seed from the operating system's randomness (never from torch's global generator)."""
    return secrets.randbelow(DRAWN_LIMIT)


def check_seed(seed, where: str = "") -> int:
    """`seed` as an int if it is an integer in [0, 2**63); EngineError naming it otherwise."""
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT:
        raise EngineError(f"seed{where} must be an integer in [0, 2**63), got {type(seed).__name__} {seed!r}")
    return int(seed)


def image_generators(seed, generator, num: int, device, where: str = "") -> tuple:
    """One request's noise: -> (generator(s) as the latents' draw takes them, the seed of each image). A generator
    given is used as it is (diffusers' batch draw; no seeds); otherwise image j gets a generator seeded seed + j
    (seed None: a fresh one), a single generator when the request has one image."""
    if generator is not None:
        return generator, [None] * num
    first = random_seed() if seed is None else check_seed(seed, where)
    seeds = [first + j for j in range(num)]
    gens = [torch.Generator(device).manual_seed(s) for s in seeds]
    return (gens[0] if num == 1 else gens), seeds


class PipelineOutput(list):
    """The list of images a call returns, with `.images` (the list itself), `.seeds` and `.timings`."""

    def __init__(self, images=(), seeds=(), timings=None):
        super().__init__(images)
        self.seeds, self.timings = list(seeds), dict(timings or {})

    @property
    def images(self) -> "PipelineOutput":
        return self

    def __reduce__(self):
        return PipelineOutput, (list(self), self.seeds, self.timings)


class LatentOutput(torch.Tensor):
    """The latents a call returns with output_type="latent" (images, C, h, w), with `.images` (the tensor itself),
    `.seeds` and `.timings`; what is computed from it is a plain tensor."""
    __torch_function__ = torch._C._disabled_torch_function_impl
    seeds: list
    timings: dict

    @property
    def images(self) -> "LatentOutput":
        return self


def call_output(out, seeds: list, timings: dict):
    """A call's images (a list) or latents (a tensor) -> its PipelineOutput or LatentOutput."""
    if isinstance(out, torch.Tensor):
        latents = out.as_subclass(LatentOutput)
        latents.seeds, latents.timings = list(seeds), dict(timings)
        return latents
    return PipelineOutput(out, seeds, timings)
