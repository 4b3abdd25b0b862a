"""ControlNet on the engine's pipeline: what diffusers' StableDiffusion(XL)ControlNetPipeline does, with the adapter on
top (an SDXL ControlNet also reads each row's pooled text embedding and time ids, as the SDXL UNet does).

    pipe = Pipeline.from_pretrained(model, image_encoder=..., adapter=..., controlnet="path/to/controlnet-canny")
    images = pipe(prompt, image, instruct, control_image="edges.png", controlnet_conditioning_scale=0.8)

Every UNet row (each guidance branch of each request) gets its request's control image, as diffusers gives both
halves of its CFG batch the image; the ControlNet's cross-attention reads that row's text tokens only (the
adapter lives in the UNet's processors alone). Each step, the nets' down and mid residuals (several nets: summed,
as MultiControlNetModel does) are scaled per row, by the request's conditioning scale times 0 or 1 for the step's
place in [control_guidance_start, control_guidance_end), and added inside the UNet. guess_mode keeps the
residuals on the rows of the prompt branch only (zeros elsewhere, as diffusers runs the net on the conditional
half only) with the net's own scales from 0.1 to 1 across the blocks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ipadapter_instruct.engine import bounds
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.loading import load_image
from ipadapter_instruct.engine.preflight import controlnet_misfit
from ipadapter_instruct.engine.safe_load import load_error, refusal


def load_controlnets(paths, unet, dtype: torch.dtype, vae_factor: int | None = None) -> list:
    """diffusers ControlNetModel folders -> models, checked against the UNet they feed (and the VAE's downsampling
    factor, which the nets' conditioning embedding must match)."""
    from diffusers import ControlNetModel

    nets = []
    for path in ([paths] if isinstance(paths, (str, os.PathLike)) else list(paths)):
        if not os.path.isdir(path):
            raise EngineError(f"ControlNet folder not found: {os.fspath(path)}")
        try:
            net = ControlNetModel.from_pretrained(path, torch_dtype=dtype)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            if refusal(e):
                raise load_error(f"the ControlNet {os.fspath(path)}", e, path) from None
            raise EngineError(f"cannot load the ControlNet {os.fspath(path)}: "
                              f"{(str(e).splitlines() or [type(e).__name__])[0][:200]}") from None
        misfit = controlnet_misfit(dict(net.config), dict(unet.config), vae_factor)
        if misfit:
            raise EngineError(f"the ControlNet {os.fspath(path)} does not fit this UNet: {misfit}")
        nets.append(net.eval().requires_grad_(False))
    if not nets:
        raise EngineError("controlnet= names no folder")
    return nets


@dataclass
class ControlState:
    """One call's control inputs per UNet row."""
    images: list[torch.Tensor]  # per net: (rows, 3, H, W) in [0, 1]
    scales: torch.Tensor        # (nets, rows) conditioning scale per net and row
    starts: list[float]         # per net
    ends: list[float]
    guess_rows: torch.Tensor | None  # (rows,) 1 for prompt-branch rows in guess mode, else None
    active: list[bool]          # per net: any row with a non-zero scale (read once: no host sync per step)


def per_net(value, n: int, name: str) -> list:
    """One value per net, each within its field's range (engine/bounds.py)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise EngineError(f"{name} has {len(values)} values for {n} ControlNets")
    return [bounds.number(name, v, f" of ControlNet {k}" if n > 1 else "") for k, v in enumerate(values)]


def control_numbers(nets: int, n: int, scale, start, end) -> tuple[list, list, list]:
    """A call's ControlNet numbers checked (engine/bounds.py), before any heavy work: -> (per request the scale of
    each net, per net its start, per net its end)."""
    scales = scale if isinstance(scale, (list, tuple)) and nets == 1 and len(scale) == n else None
    per_req = [[bounds.number("controlnet_conditioning_scale", s, f" of request {r}")] for r, s in enumerate(scales)] \
        if scales is not None else [per_net(scale, nets, "controlnet_conditioning_scale")] * n
    starts, ends = per_net(start, nets, "control_guidance_start"), per_net(end, nets, "control_guidance_end")
    for k, (a, b) in enumerate(zip(starts, ends)):
        if a > b:
            raise EngineError(f"control_guidance_start {a:g} is after control_guidance_end {b:g}"
                              + (f" (ControlNet {k})" if nets > 1 else ""))
    return per_req, starts, ends


def control_state(pipe, nets, reqs, plan, height: int, width: int, control_image, scale, start, end,
                  guess_mode: bool) -> ControlState:
    """Control images preprocessed as diffusers does (resize to the output size, [0, 1]) and indexed per row.
    control_image: one image or one per request; with several nets, a list with that per net (diffusers' order)."""
    from diffusers.image_processor import VaeImageProcessor

    n = len(reqs)
    if control_image is None:
        raise EngineError("a ControlNet is loaded: give control_image= (one per request)")
    several = isinstance(control_image, (list, tuple))
    per_net_images = list(control_image) if len(nets) > 1 and several else [control_image]
    if len(per_net_images) != len(nets):
        raise EngineError(f"{len(nets)} ControlNets are loaded: give control_image as a list of {len(nets)} "
                          "(one per net, each an image or one per request)")
    per_req, starts, ends = control_numbers(len(nets), n, scale, start, end)
    proc = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor, do_convert_rgb=True, do_normalize=False)
    rows = torch.tensor(plan["row_request"])
    loaded, pixels = {}, []
    for given in per_net_images:
        images = list(given) if isinstance(given, (list, tuple)) else [given] * n
        if len(images) != n:
            raise EngineError(f"control_image has {len(images)} images for {n} requests")
        if any(im is None for im in images):
            raise EngineError("a ControlNet is loaded: give control_image= (one per request)")
        for im in images:
            if id(im) not in loaded:
                loaded[id(im)] = proc.preprocess(load_image(im, "control image"), height=height, width=width)
        pixels.append(torch.cat([loaded[id(im)] for im in images])[rows].to(pipe.device, pipe.dtype))
    table = torch.tensor(per_req, dtype=torch.float32).T[:, rows].to(pipe.device)  # (nets, rows)
    guess = None
    if guess_mode:  # the prompt branch's rows: diffusers' conditional half
        prompt_rows = [plan["branches"][j]["name"] == "full" for j in plan["branch_of_row"].tolist()]
        guess = torch.tensor(prompt_rows, dtype=torch.float32, device=pipe.device)
    return ControlState(pixels, table, starts, ends, guess, active_nets(table, guess))


def active_nets(scales: torch.Tensor, guess_rows: torch.Tensor | None) -> list[bool]:
    """Per net: whether any row has a non-zero weight (read once per call or flight, not per step)."""
    weight = scales * (guess_rows if guess_rows is not None else 1.0)
    return [bool(weight[k].any()) for k in range(scales.shape[0])]


def in_window(start: float, end: float, step: int, total: int) -> bool:
    """Whether a net acts at `step` (from 0) of `total`: diffusers' controlnet_keep rule."""
    return start <= step / total and (step + 1) / total <= end


def net_residuals(net, x, t, text_rows, images, weight, guess_mode: bool, added=None):
    """One net's (down residuals, mid residual) over the rows of x, each row scaled by `weight` (rows,)."""
    d, m = net(x, t, encoder_hidden_states=text_rows, controlnet_cond=images, conditioning_scale=1.0,
               guess_mode=guess_mode, return_dict=False, **({} if added is None else {"added_cond_kwargs": added}))
    w = weight.to(x.dtype).view(-1, 1, 1, 1)
    return [r * w for r in d], m * w


def summed(total, part):
    """Residuals of several nets added up (MultiControlNetModel's sum); total None: the first net's."""
    if total is None:
        return part
    return [a + b for a, b in zip(total[0], part[0])], total[1] + part[1]


def residuals(nets, state: ControlState, x, t, text_rows, step: int, total: int, guess_mode: bool, added=None):
    """(down residuals, mid residual) for this step, summed over the nets, scaled per row; None when every scale
    is 0 this step (the UNet then runs as without a ControlNet). added: SDXL's added conditioning per row (pooled
    text embeddings and time ids), which an SDXL ControlNet reads as its UNet does."""
    out = None
    for k, net in enumerate(nets):
        if not state.active[k] or not in_window(state.starts[k], state.ends[k], step, total):
            continue  # every scale 0 this step: the UNet runs as without this net
        scale = state.scales[k] if not guess_mode else state.scales[k] * state.guess_rows
        out = summed(out, net_residuals(net, x, t, text_rows, state.images[k], scale, guess_mode, added))
    return out
