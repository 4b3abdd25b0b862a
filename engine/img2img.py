"""Starting from a photo: image-to-image (`init_image=`, `strength=`) and inpainting (`mask_image=` as well), as
diffusers' StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline run them, on every request of a call.

img2img: the photo's VAE latent (a sample of its latent distribution, times the VAE's scaling factor) is noised to
the step that `strength` selects (diffusers' `get_timesteps`: the last int(steps x strength) of the schedule run)
and the rest of the schedule runs from there. Inpainting (white in the mask = repaint, black = keep) has two forms:

    9-channel UNet (an inpainting model)  the UNet reads, beside the latents, the mask at latent size and the latent
                                          of the photo with the repainted region blacked out (engine.prepared's
                                          ExtraChannels, per UNet row); strength 1 starts from noise alone
    4-channel UNet (any model)            the kept region is re-imposed after every step from the photo's latent
                                          noised to the next step (`Keep`)

Seeds: each request's generator (or each image's, engine/results.py) draws what diffusers draws, in its order: the
photo's latent sample (img2img, and inpainting unless a 9-channel model starts from noise), the noise, then (in
inpainting) the masked photo's latent sample, which a 4-channel UNet never reads but diffusers still draws. So a
seed gives diffusers' image, and the scheduler's later draws (ancestral steps) follow from the same state.

Requests of one call share a schedule: requests whose strengths start at different steps are run as separate
groups by the pipeline (`start_index` is the key); the server batches them apart (its batch key holds it).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

from ipadapter_instruct.engine import bounds
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.loading import load_image

# diffusers' defaults: StableDiffusionImg2ImgPipeline 0.8, StableDiffusionInpaintPipeline 1.0 (SDXL: engine/sdxl.py)
STRENGTH = {"img2img": 0.8, "inpaint": 1.0}


@dataclass
class Start:
    """Where one request starts: its photo, the mask (inpainting) and the strength."""
    photo: object            # PIL image (RGB)
    mask: object = None      # PIL image / array / tensor as diffusers' mask processor reads it (white = repaint)
    strength: float = 1.0

    @property
    def task(self) -> str:
        return "inpaint" if self.mask is not None else "img2img"


def inpainting_unet(pipe) -> bool:
    """Whether the UNet is an inpainting one: latents + mask + masked-image latents (9 channels on SD)."""
    latent = pipe.vae.config.latent_channels
    return pipe.unet.config.in_channels == 2 * latent + 1


def parse_start(pipe, init_image, mask_image, strength, where: str, loaded: dict) -> Start | None:
    """A request's init_image / mask_image / strength, checked (EngineError naming the field) -> its Start, or None
    for text-to-image."""
    if init_image is None:
        if mask_image is not None:
            raise EngineError(f"mask_image{where} was given without init_image: inpainting repaints a photo; give "
                              "init_image= (the photo) too")
        if strength is not None:
            raise EngineError(f"strength{where} was given without init_image: it says how far from the photo to "
                              "start; give init_image= too, or drop strength")
        if inpainting_unet(pipe):
            raise EngineError("this is an inpainting model (its UNet reads a mask and a masked photo): give "
                              "init_image= and mask_image=")
        return None
    if mask_image is None and inpainting_unet(pipe):
        raise EngineError(f"mask_image{where} is required: this is an inpainting model (its UNet reads a mask); "
                          "white in the mask is repainted, black kept")
    if id(init_image) not in loaded:
        loaded[id(init_image)] = load_image(init_image, "init_image")
    photo = loaded[id(init_image)]
    mask = None
    if mask_image is not None:
        mask = _mask(mask_image, loaded)
        size = _mask_size(mask)
        if size is not None and size != (photo.width, photo.height):
            raise EngineError(f"mask_image{where} is {size[0]}x{size[1]} but init_image is {photo.width}x"
                              f"{photo.height}: the mask must be the photo's size")
    default = pipe.STRENGTH["inpaint" if mask is not None else "img2img"]
    value = default if strength is None else bounds.number("strength", strength, where)
    if value <= 0.0:
        raise EngineError(f"strength{where} must be in (0, 1], got {strength!r}: 0 would run no step")
    return Start(photo, mask, value)


def _mask(mask, loaded: dict):
    if isinstance(mask, (str, bytes)) or hasattr(mask, "__fspath__"):
        if id(mask) not in loaded:
            loaded[id(mask)] = load_image(mask, "mask_image").convert("L")
        return loaded[id(mask)]
    if hasattr(mask, "convert") or isinstance(mask, torch.Tensor) or hasattr(mask, "__array__"):
        return mask
    raise EngineError(f"mask_image must be a PIL image, a path, an array or a tensor, got {type(mask).__name__}")


def _mask_size(mask) -> tuple[int, int] | None:
    # (width, height) of a mask, or None when its layout does not say
    if hasattr(mask, "size") and isinstance(mask.size, tuple):
        return mask.size
    shape = tuple(getattr(mask, "shape", ()))
    if len(shape) == 2:
        return shape[1], shape[0]
    return None


def start_index(num_inference_steps: int, strength: float) -> int:
    """The first step a strength runs (diffusers' get_timesteps: int(steps x strength) steps run, the last ones)."""
    return num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)


def request_start(req, num_inference_steps: int) -> int:
    return 0 if req.start is None else start_index(num_inference_steps, req.start.strength)


def cut_schedule(sched, num_inference_steps: int, reqs: list):
    """The timesteps a call runs: all of them for text-to-image, else from its requests' one start index (set as
    the scheduler's begin index, as diffusers' img2img does). -> the timesteps."""
    starts = {request_start(r, num_inference_steps) for r in reqs}
    if len(starts) > 1:  # (the pipeline groups requests by start before it gets here)
        raise EngineError(f"the requests of one call start at different steps {sorted(starts)}")
    if not any(r.start is not None for r in reqs):
        return sched.timesteps
    first = first_step(next(r.start.strength for r in reqs if r.start is not None), num_inference_steps)
    order = getattr(sched, "order", 1)
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(first * order)
    return sched.timesteps[first * order:]


def groups(reqs: list, num_inference_steps: int) -> list[list[int]]:
    """Request indices grouped by start step, in order of first appearance (one group when all start together)."""
    out: dict = {}
    for i, r in enumerate(reqs):
        out.setdefault(request_start(r, num_inference_steps), []).append(i)
    return list(out.values())


@dataclass
class Keep:
    """Inpainting on a 4-channel UNet: after each step the kept region (mask 0) is the photo's latent noised to the
    next step, as diffusers' inpaint pipeline re-imposes it; images without a mask carry ones (all generated)."""
    mask: torch.Tensor   # (images, 1, h, w): 1 = repaint, 0 = keep
    image: torch.Tensor  # (images, C, h, w): the photo's latent
    noise: torch.Tensor  # (images, C, h, w): the noise the initial latents were made with

    def select(self, index: torch.Tensor) -> "Keep":
        return Keep(self.mask.index_select(0, index), self.image.index_select(0, index),
                    self.noise.index_select(0, index))

    def apply(self, latents: torch.Tensor, sched, timesteps, i: int) -> torch.Tensor:
        """The latents after step i (from 0) with the kept region re-imposed."""
        proper = self.image
        if i < len(timesteps) - 1:
            proper = sched.add_noise(proper, self.noise, torch.tensor([timesteps[i + 1]]))
        return (1 - self.mask) * proper + self.mask * latents


def start_latents(pipe, reqs: list, sched, timesteps, height: int, width: int, call=None) -> tuple:
    """The call's initial latents (images, C, h, w), each request's drawn from its own generator(s) in diffusers'
    order, and what inpainting needs later: -> (latents, extra UNet channels per image (images, 1 + C, h, w) for a
    9-channel UNet or None, Keep for a 4-channel UNet with a mask or None). With a photo in the call, the work is
    timed as its `image_latent_ms` stage (call: its CallState)."""
    if call is not None and any(r.start is not None for r in reqs):
        with call.timed("image_latent_ms", pipe.device):
            return start_latents(pipe, reqs, sched, timesteps, height, width)
    f = pipe.vae_scale_factor
    shape = (pipe.vae.config.latent_channels, height // f, width // f)
    nine = inpainting_unet(pipe)
    keeps = not nine and any(r.start is not None and r.start.mask is not None for r in reqs)
    latents, extra, keep, dists = [], [], [], {}  # dists: a request's photo encoded once for all its images
    for req in reqs:
        gens = req.generator if isinstance(req.generator, list) else [req.generator]  # per image, or one for all
        n = req.num_images // len(gens)
        for g in gens:
            if req.start is None:
                noise = randn_tensor((n, *shape), generator=g, device=pipe.device, dtype=pipe.dtype)
                latents.append(noise * sched.init_noise_sigma)
                if keeps:
                    keep.append((torch.ones_like(noise[:, :1]), torch.zeros_like(noise), torch.zeros_like(noise)))
                continue
            x, more, kept = _from_photo(pipe, req.start, g, n, shape, sched, timesteps[:1], (height, width), nine,
                                        dists.setdefault(id(req), {}))
            latents.append(x)
            extra.append(more)
            if keeps:
                keep.append(kept if kept is not None else
                            (torch.ones_like(x[:, :1]), torch.zeros_like(x), torch.zeros_like(x)))
    x = torch.cat(latents)
    keep = Keep(*(torch.cat(parts) for parts in zip(*keep))) if keeps else None
    return x, (torch.cat(extra) if nine else None), keep


def _from_photo(pipe, start: Start, g, n: int, shape: tuple, sched, t0, size: tuple, nine: bool, dists: dict):
    """One generator's share of a request with a photo: -> (latents (n, C, h, w), extra channels or None, the
    Keep parts (mask, image latent, noise) or None). dists: the request's preprocessed photo and mask and their
    distributions, made by the first of its generators (each generator then draws its own sample)."""
    if "pixels" not in dists:
        dists.update(_preprocessed(pipe, start, size))
    pixels, condition = dists["pixels"], dists["condition"]
    inpaint = start.mask is not None
    noise_only = inpaint and start.strength == 1.0  # diffusers' is_strength_max: pure noise, photo latent unread
    dist = None
    if not (noise_only and nine):
        if "photo" not in dists:
            dists["photo"] = pipe.photo_distribution(pixels.to(pipe.device, pipe.dtype))
        dist = dists["photo"]
    image = None if dist is None else pipe.photo_latents(dist.sample(g)).expand(n, *shape)
    noise = randn_tensor((n, *shape), generator=g, device=pipe.device, dtype=pipe.dtype)
    if noise_only:
        x = noise * sched.init_noise_sigma
    else:
        x = sched.add_noise(image, noise, t0.repeat(n))
    if not inpaint:
        return x, None, None
    mask = torch.nn.functional.interpolate(condition, size=shape[1:]).to(pipe.device, pipe.dtype).expand(n, 1, *shape[1:])
    if nine:
        if "masked" not in dists:
            dists["masked"] = pipe.photo_distribution((pixels * (condition < 0.5)).to(pipe.device, pipe.dtype))
        masked = dists["masked"]
        return x, torch.cat([mask, pipe.photo_latents(masked.sample(g)).expand(n, *shape)], dim=1), None
    # diffusers encodes the masked photo even for a 4-channel UNet, which never reads it: draw what its sample draws
    randn_tensor(dist.mean.shape, generator=g, device=dist.mean.device, dtype=dist.mean.dtype)
    return x, None, (mask, image, noise)


def _preprocessed(pipe, start: Start, size: tuple) -> dict:
    """A request's photo in [-1, 1] at `size` and its binarised mask (None without one), as diffusers' image and
    mask processors make them: once per request, whatever its number of images."""
    from diffusers.image_processor import VaeImageProcessor  # (deferred: only calls that start from a photo)

    f, (height, width) = pipe.vae_scale_factor, size
    out = {"pixels": VaeImageProcessor(vae_scale_factor=f).preprocess(start.photo, height=height, width=width),
           "condition": None}
    if start.mask is not None:
        processor = VaeImageProcessor(vae_scale_factor=f, do_normalize=False, do_binarize=True,
                                      do_convert_grayscale=True)
        try:
            out["condition"] = processor.preprocess(start.mask, height=height, width=width)
        except (ValueError, TypeError) as e:
            raise EngineError(f"mask_image cannot be read: {e}") from e
    return out


def photo_size(reqs: list, height, width, f: int, inpaint: bool = False) -> tuple:
    """img2img's output size when none is given: its photo's, rounded down to the VAE grid (as diffusers'
    img2img); inpainting (unless `inpaint`: diffusers' ControlNet inpaint pipelines take the photo's size too) and
    text-to-image leave it to the model's native size."""
    if height is not None or width is not None:
        return height, width
    sizes = {(r.start.photo.height // f * f, r.start.photo.width // f * f) for r in reqs
             if r.start is not None and (inpaint or r.start.mask is None)}
    if len(sizes) > 1:
        raise EngineError(f"the photos of one call must round to one size, got {sorted(sizes)}: give height and "
                          "width, or run them in separate calls")
    if not sizes:
        return None, None
    height, width = sizes.pop()
    if height < f or width < f:
        raise EngineError(f"init_image is smaller than the VAE's {f} px grid")
    return height, width


def run_groups(pipe, reqs: list, parts: list, args: dict, call, t_start: float):
    """A call whose requests start at different steps: each group of one start prepared, denoised and decoded as
    its own run, the outputs put back in request order (timings summed). A request that goes non-finite fails alone
    (NonFinite names it by its index in the whole call)."""
    from ipadapter_instruct.engine.combine import NonFinite
    from ipadapter_instruct.engine.prepared import CallState
    from ipadapter_instruct.engine.results import call_output

    out, bad, timings = [None] * len(reqs), [], {}
    for group in parts:
        sub = [reqs[i] for i in group]
        own = CallState(size_conditioning=call.size_conditioning)
        p = pipe.prepare(sub, args, own)
        try:
            result = pipe._outputs(pipe._denoise(p, args["progress_callback"]), sub, args["output_type"], t_start,
                                   own)
        except NonFinite as e:
            result = e.outputs
            bad += [group[r] for r in e.requests]
        at = 0
        for i in group:
            n = reqs[i].num_images
            out[i], at = result[at:at + n], at + n
        for k, v in own.timings.items():
            timings[k] = timings.get(k, 0.0) + v
    timings["total_ms"] = (time.perf_counter() - t_start) * 1e3
    call.timings.update(timings)
    pipe._last.value = call.timings
    joined = torch.cat(out) if args["output_type"] == "latent" else [im for o in out for im in o]
    if bad:
        raise NonFinite(sorted(bad), joined)
    return call_output(joined, [s for r in reqs for s in r.seeds], call.timings)


def first_step(strength: float, num_inference_steps: int) -> int:
    """The step a strength starts at; EngineError when it leaves none to run (int(steps x strength) = 0)."""
    first = start_index(num_inference_steps, strength)
    if first >= num_inference_steps:
        raise EngineError(f"strength {strength:g} with {num_inference_steps} steps runs no step (int(steps x "
                          "strength) = 0): raise strength or num_inference_steps")
    return first


def check_start_steps(reqs: list, num_inference_steps) -> None:
    """A photo's strength must leave at least one step to run (checked when a call is parsed, before any work)."""
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        return  # (the step count's own check names it)
    for r in reqs:
        if r.start is not None:
            first_step(r.start.strength, num_inference_steps)
