"""A call's requests: its keyword arguments (one value, or a list with one per request) checked and turned into
`Request`s, one `Slot` per loaded adapter. The rules that the server applies to a request body before queueing it
are these same functions (engine/server/runners.py), so each is written once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from PIL import Image

from ipadapter_instruct.engine import DEFAULT_NEGATIVE, DEFAULT_PROMPT, bounds
from ipadapter_instruct.engine.controlnet import control_numbers
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.img2img import check_start_steps, parse_start
from ipadapter_instruct.engine.loading import load_image
from ipadapter_instruct.engine.results import image_generators

log = logging.getLogger("ipadapter_instruct.engine.pipeline")


@dataclass
class Slot:
    """One loaded adapter's part of one request (several adapters: one slot each, in load order)."""
    images: list                   # PIL images; several: their tokens are concatenated, as diffusers does
    scale: float | dict
    mask: object = None            # a mask image/array/tensor for IPAdapterMaskProcessor; None: everywhere
    start: float = 0.0             # the fraction of the steps where the adapter begins to act
    end: float = 1.0               # ... and where it stops (diffusers' control_guidance_start/end rule)

    def active(self, step: int, total: int) -> bool:
        # step counts from 0, as diffusers' ControlNet pipelines' `controlnet_keep`
        return not (step / total < self.start or (step + 1) / total > self.end)


@dataclass
class Request:
    prompt: str
    negative_prompt: str
    image: Image.Image | None
    instruct: str | None
    scale: float | dict
    guidance_scale: float
    instruct_guidance_scale: float
    image_guidance_scale: float
    guidance_mode: str
    num_images: int
    generator: torch.Generator | list | None    # one for the request, or one per image (engine/results.py)
    slots: list = field(default_factory=list)  # one Slot per loaded adapter
    seeds: list = field(default_factory=list)  # per image: the seed that gives it back (None: a caller's generator)
    start: object = None  # engine.img2img.Start: the photo (and mask, strength) it starts from; None: noise


def check_instruction(instruct) -> None:
    """IPAdapter-Instruct reads an instruction: an empty one is refused (field `instruct`)."""
    if not isinstance(instruct, str) or not instruct.strip():
        raise EngineError("instruction is empty: say what to take from the image, e.g. 'use the style of this image'")


def per_row_refusal(runtime: str) -> str:
    return (f"adapter masks and step ranges run on the PyTorch backend; this pipeline runs {runtime} graphs, whose "
            "adapter attention takes one strength per row")


def check_per_row_adapter(caps, masked: bool, start: float, end: float) -> None:
    """Adapter masks and step ranges need the PyTorch processors (exported graphs take one strength per row)."""
    if not caps.per_row_adapter and (masked or start > 0.0 or end < 1.0):
        raise EngineError(per_row_refusal(caps.runtime))


def alias(args: dict, name: str, old: str) -> dict:
    """`name` (diffusers' name) or `old` (the engine's former name, kept as an alias): at most one of them given.
    -> args with the value under `old` (what the engine reads) and `name` emptied."""
    if args.get(name) is not None and args.get(old) is not None:
        raise EngineError(f"{name}= and {old}= are one argument ({old} is the old name of {name}): give one")
    return {**args, old: args.get(old) if args.get(name) is None else args[name], name: None}


def default_prompts(p: dict, adapter: bool) -> None:
    """A prompt or negative prompt of None: the adapter's defaults with an adapter; without one, as diffusers, a
    prompt is required and no negative prompt is the empty one."""
    if p["prompt"] is None:
        if not adapter:
            raise EngineError("a prompt is required for text-to-image generation (prompt=)")
        p["prompt"] = DEFAULT_PROMPT
    if p["negative_prompt"] is None:
        p["negative_prompt"] = DEFAULT_NEGATIVE if adapter else ""


def parse_requests(pipe, args: dict) -> list[Request]:
    """A call's keyword arguments -> one Request per request (per-request lists, or one value for all), every value
    checked against the pipeline's adapters (EngineError naming it) before any heavy work."""
    per_request = ("prompt", "image", "instruct", "negative_prompt", "scale", "guidance_scale",
                   "instruct_guidance_scale", "image_guidance_scale", "guidance_mode", "seed", "generator",
                   "adapter_masks", "adapter_start", "adapter_end", "init_image", "mask_image", "strength")
    defaults = {"adapter_masks": None, "adapter_start": 0.0, "adapter_end": 1.0,  # (EditPipeline has none)
                "init_image": None, "mask_image": None, "strength": None}
    args = alias({**defaults, **args}, "ip_adapter_image", "image")
    lengths = {len(args[k]) for k in per_request if isinstance(args[k], (list, tuple))}
    if len(lengths) > 1:
        raise EngineError(f"per-request lists must have one length, got lengths {sorted(lengths)}")
    n = lengths.pop() if lengths else 1
    if n == 0:
        raise EngineError("no requests: the per-request lists are empty")
    pick = {k: (list(args[k]) if isinstance(args[k], (list, tuple)) else [args[k]] * n) for k in per_request}
    num = args["num_images_per_prompt"]
    if not isinstance(num, int) or num < 1:
        raise EngineError(f"num_images_per_prompt must be a positive integer, got {num!r}")
    reqs, loaded = [], {}
    for i in range(n):
        p = {k: v[i] for k, v in pick.items()}
        where = f" of request {i}" if n > 1 else ""
        for k in ("guidance_scale", "instruct_guidance_scale", "image_guidance_scale"):
            p[k] = bounds.number(k, p[k], where)  # (engine/bounds.py: the server's schemas read the same table)
        default_prompts(p, pipe.adapter is not None)
        for k in ("prompt", "negative_prompt"):
            if not isinstance(p[k], str):
                raise EngineError(f"{k} must be a string, got {type(p[k]).__name__}")
        slots = []
        if pipe.adapter is None:
            bounds.scale(p["scale"], where)  # (unused without an adapter, but held to the same rule)
            if p["image"] is not None:
                raise EngineError("a condition image was given but no adapter is loaded (from_pretrained(adapter=...))")
            given = [k for k, off in (("adapter_masks", p["adapter_masks"] is None),
                                      ("adapter_start", p["adapter_start"] == 0.0),
                                      ("adapter_end", p["adapter_end"] == 1.0)) if not off]
            if given:
                raise EngineError(f"{given[0]} was given but no adapter is loaded (from_pretrained(adapter=...))")
        else:
            slots = _slots(pipe, p, i, loaded)
            kinds = {a.kind for a in pipe.adapters}
            if "instruct" in kinds and (not isinstance(p["instruct"], str) or not p["instruct"].strip()):
                raise EngineError("instruction is empty: say what to take from the image, "
                                  "e.g. 'use the style of this image'")
            if "instruct" not in kinds and p["instruct"]:
                log.warning("the instruction %r is ignored: the loaded adapter is IP-Adapter+, which takes "
                            "no instruction", p["instruct"])
        start = parse_start(pipe, p["init_image"], p["mask_image"], p["strength"], where, loaded)
        gen, seeds = image_generators(p["seed"], p["generator"], num, pipe.device, where)
        reqs.append(Request(p["prompt"], p["negative_prompt"], slots[0].images[0] if slots else None,
                            p["instruct"], slots[0].scale if slots else p["scale"],
                            float(p["guidance_scale"]), float(p["instruct_guidance_scale"]),
                            float(p["image_guidance_scale"]), p["guidance_mode"], num, gen, slots, seeds, start))
    check_start_steps(reqs, args.get("num_inference_steps"))
    if pipe.adapter is not None:
        counts = {tuple(len(s.images) for s in r.slots) for r in reqs}
        if len(counts) > 1:
            raise EngineError(f"the requests of one call must give each adapter the same number of images, got "
                              f"{sorted(counts)} (images per adapter): run them in separate calls")
    return reqs

def _slots(pipe, p: dict, i: int, loaded: dict) -> list[Slot]:
    """Request i's part for each loaded adapter: images, scale, mask and step range, checked."""
    n = len(pipe.adapters)
    where = f"request {i}" if n == 1 else f"request {i} (with {n} adapters)"

    def per_adapter(key, value, is_list=lambda v: isinstance(v, (list, tuple))):
        if n > 1 and is_list(value):
            if len(value) != n:
                raise EngineError(f"{key} of {where}: got {len(value)} values, give one for every adapter "
                                  f"or one list with {n} (the outer list is one entry per request)")
            return list(value)
        return [value] * n

    def image_list(value) -> list:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if not items or any(v is None for v in items):
            raise EngineError(f"a condition image is required with an adapter ({where})")
        for v in items:
            if id(v) not in loaded:
                loaded[id(v)] = load_image(v)
        return [loaded[id(v)] for v in items]

    images = per_adapter("image", p["image"])
    scales = per_adapter("scale", p["scale"])
    masks = per_adapter("adapter_masks", p["adapter_masks"])
    starts = per_adapter("adapter_start", p["adapter_start"])
    ends = per_adapter("adapter_end", p["adapter_end"])
    slots = []
    for a in range(n):
        scale = bounds.scale(scales[a], f" of {where}")  # a number or a per-block dict, every number bounded
        for key, v in (("adapter_start", starts[a]), ("adapter_end", ends[a])):
            bounds.number(key, v, f" of {where}")
        if starts[a] > ends[a]:
            raise EngineError(f"adapter_start {starts[a]} is after adapter_end {ends[a]} ({where})")
        slot = Slot(image_list(images[a]), scale, masks[a], float(starts[a]), float(ends[a]))
        check_per_row_adapter(pipe.capabilities, slot.mask is not None, slot.start, slot.end)
        if slot.mask is not None and len(slot.images) > 1:
            raise EngineError(f"a masked adapter reads one image; {where} gives adapter {a} "
                              f"{len(slot.images)} images and a mask")
        slots.append(slot)
    return slots


def control_args(pipe, args: dict, n: int) -> dict | None:
    """A call's (or an admission's) ControlNet inputs, their numbers checked before any heavy work; None without
    a ControlNet (engine/controlnet.py; per request: control_image and its scale)."""
    if not pipe.controlnets:
        if args.get("control_image") is not None:
            raise EngineError("control_image was given but no ControlNet is loaded (from_pretrained(controlnet="
                              "...), or an export made with --controlnet)")
        return None
    control = dict(control_image=args["control_image"], scale=args["controlnet_conditioning_scale"],
                   start=args["control_guidance_start"], end=args["control_guidance_end"],
                   guess_mode=bool(args["guess_mode"]))
    control_numbers(len(pipe.controlnets), n, control["scale"], control["start"], control["end"])
    return control
