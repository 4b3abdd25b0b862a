"""The finite range of every number a request sends: one table that the Python API (EngineError) and the HTTP
schemas (a 422 naming the field) both read, so a value is refused by the same rule wherever it comes in.

A finite number can still overflow: `guidance_scale: 1e308` times a noise prediction is infinity. The ranges are
wide enough for every real use (the released pipelines use guidance 1-15 and strengths 0-1.5) and narrow enough
that no value in them overflows float32 arithmetic on its own. That a request's numbers cannot reach another
request's image does not rest on these bounds (see `guidance.combine`); they keep a request's own result finite.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from ipadapter_instruct.engine.errors import EngineError


@dataclass(frozen=True)
class Bound:
    low: float
    high: float
    why: str


GUIDANCE = Bound(0.0, 50.0, "a guidance scale: 1 is off, useful values are 1 to 20")
STRENGTH = Bound(-10.0, 10.0, "a strength: useful values are 0 to 2, negative ones push away")
FRACTION = Bound(0.0, 1.0, "a fraction of the steps")

BOUNDS = {
    "guidance_scale": GUIDANCE,
    "instruct_guidance_scale": GUIDANCE,
    "image_guidance_scale": GUIDANCE,
    "scale": STRENGTH,                          # the adapter's, a number or every number of a per-block dict
    "controlnet_conditioning_scale": STRENGTH,
    "adapter_start": FRACTION,
    "adapter_end": FRACTION,
    "control_guidance_start": FRACTION,
    "control_guidance_end": FRACTION,
    "strength": Bound(0.0, 1.0, "how far from the photo to start: 1 runs every step, small values keep the photo"),
}


def number(field: str, value, where: str = "") -> float:
    """`value` as a float if it is a number within BOUNDS[field]; EngineError naming the field otherwise.
    where: e.g. " of request 1", appended to the field's name in the message."""
    b = BOUNDS[field]
    if not is_number(value):
        raise EngineError(f"{field}{where} must be a number in [{b.low:g}, {b.high:g}], got "
                          f"{type(value).__name__} {value!r}")
    v = float(value)
    if not (math.isfinite(v) and b.low <= v <= b.high):
        raise EngineError(f"{field}{where} must be a finite number in [{b.low:g}, {b.high:g}] ({b.why}), "
                          f"got {value!r}")
    return v


def is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def scale(value, where: str = "", field: str = "scale"):
    """An adapter scale: a number, or an InstantStyle per-block dict whose every number (in nested dicts and
    lists) is within BOUNDS[field]. Returns the value as given (a number as a float); EngineError otherwise."""
    if not isinstance(value, dict):
        if not is_number(value):
            b = BOUNDS[field]
            raise EngineError(f"adapter {field}{where} must be a number or a per-block dict (numbers in "
                              f"[{b.low:g}, {b.high:g}]), got {type(value).__name__} {value!r}")
        return number(field, value, where)
    _walk(value, field, where, field)
    return value


def _walk(value, field: str, where: str, path: str) -> None:
    if isinstance(value, dict):
        for key, v in value.items():
            _walk(v, field, where, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _walk(v, field, where, f"{path}[{i}]")
    else:
        number(field, value, f"{where} (at {path})" if path != field else where)


def table() -> list[tuple[str, str, str]]:
    """(field, range, why) per bounded field: what docs/server.md lists."""
    return [(name, f"[{b.low:g}, {b.high:g}]", b.why) for name, b in BOUNDS.items()]
