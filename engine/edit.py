"""`engine.EditPipeline`: InstructPix2Pix (arXiv 2211.09800), editing a photo by instruction, on the same engine.

    pipe = EditPipeline.from_pretrained("timbrooks/instruct-pix2pix")          # a diffusers IP2P folder
    images = pipe("make it winter", image="photo.png", guidance_scale=7.5, image_guidance_scale=1.5)

The UNet takes 8 channels: the scaled noisy latent and the photo's latent (`vae.encode(photo).latent_dist.mode()`,
not multiplied by the VAE's scaling factor). Guidance is three branches in one batch, in diffusers' order
    text + image: text prompt,   image latent photo
    image only:   text negative, image latent photo
    neither:      text negative, image latent zeros
combined as  u + s_T (text - image) + s_I (image - u)  = s_T text + (s_I - s_T) image + (1 - s_I) u: the engine's
branches-and-weights pattern (guidance.py), so several requests (prompts, photos, scales) share one UNet batch and
each image equals its request alone. As in diffusers, guidance runs when s_T > 1 and s_I >= 1; otherwise the
first branch alone. Latents are drawn as diffusers' StableDiffusionInstructPix2PixPipeline draws them
(one randn of (images, 4, h, w) per request's generator), so a seed gives diffusers' image.

With an adapter (IP-Adapter+ or IPAdapter-Instruct: `ip_adapter_image=`, its old name `adapter_image=`, `instruct=`,
`scale=`), the text+image
branch gets P(reference image[, instruction, prompt]) and the other two the adapter's unconditional tokens
(P(zero image[, "", negative])), as diffusers' IP2P pipeline does with `ip_adapter_image` (its negative image
embeds are the zero image's): "edit my photo as the instruction says, taking the style (object, face) of that
reference image".
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, fields

import torch
from PIL import Image

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.loading import load_image
from ipadapter_instruct.engine.pipeline import Pipeline
from ipadapter_instruct.engine.plan import expand_rows
from ipadapter_instruct.engine.requests import Request, alias, parse_requests
from ipadapter_instruct.engine.prepared import CallState, EditContext

EDIT_NEGATIVE = ""  # diffusers' IP2P default


@dataclass
class EditRequest(Request):
    photo: Image.Image | None = None  # the image being edited (Request.image is the adapter's reference)


def edit_weights(s_t: float, s_i: float) -> tuple[float, float, float]:
    """u + s_T (text - image) + s_I (image - u) as weights on (text+image, image only, neither)."""
    return s_t, s_i - s_t, 1.0 - s_i


def edit_branches(guidance_scale: float, image_guidance_scale: float) -> list[tuple[str, str, bool, float]]:
    """(name, text, photo latent?, weight) per branch; one branch without guidance (diffusers' condition)."""
    if not (guidance_scale > 1.0 and image_guidance_scale >= 1.0):
        return [("text_image", "prompt", True, 1.0)]
    w = edit_weights(guidance_scale, image_guidance_scale)
    return [("text_image", "prompt", True, w[0]), ("image", "negative", True, w[1]),
            ("neither", "negative", False, w[2])]


class EditPipeline(Pipeline):
    """InstructPix2Pix on the engine: `from_pretrained` takes a diffusers IP2P folder (8-channel UNet)."""

    KIND = "edit"

    @classmethod
    def from_pretrained(cls, model, image_encoder=None, adapter=None, device=None, dtype=None,
                        attention_backend="auto", backend="pytorch", engines=None,
                        controlnet=None, config=None, trt="auto", verify_fast_path: bool = True,
                        torch_dtype=None) -> "EditPipeline":
        """model: a diffusers InstructPix2Pix folder (or hub id), e.g. timbrooks/instruct-pix2pix or MagicBrush in
        that layout; image_encoder + adapter: an IP-Adapter+ or IPAdapter-Instruct adapter on top (optional)."""
        if controlnet is not None:
            raise EngineError("ControlNet with InstructPix2Pix is not built: edit without controlnet=")
        if isinstance(adapter, (list, tuple)) and len(adapter) > 1:
            raise EngineError("editing takes one adapter; several adapters at once are for generation (Pipeline)")
        if backend != "pytorch":
            raise EngineError("editing runs on the PyTorch backend here (an edit export runs under ONNX Runtime with "
                              "export.onnx_runtime.OnnxEditPipeline; a TensorRT edit runtime is not built yet)")
        return super().from_pretrained(model, image_encoder=image_encoder, adapter=adapter, device=device,
                                       dtype=dtype, attention_backend=attention_backend, config=config, trt=trt,
                                       verify_fast_path=verify_fast_path, torch_dtype=torch_dtype)

    @torch.inference_mode()
    def __call__(self, prompt, image, negative_prompt=EDIT_NEGATIVE, *, guidance_scale=7.5, image_guidance_scale=1.5,
                 num_inference_steps=100, seed=None, generator=None, scheduler=None, num_images_per_prompt=1,
                 height=None, width=None, ip_adapter_image=None, instruct=None, scale=0.8, output_type="pil",
                 max_size=None, progress_callback=None, adapter_image=None):
        """Edit `image` (a path or PIL image; a list: one per request) as `prompt` says. Per-request lists for
        prompt, image, negative_prompt, the guidance scales, seed, ip_adapter_image (the adapter's reference; its old
        name adapter_image), instruct and scale. The output is the photo's size rounded down to a multiple of the VAE
        factor (as diffusers does), or height x width (the photo resized). Returns PIL images (request-major,
        `num_images_per_prompt` each), or latents, with `.images`, `.seeds` and `.timings` (engine/results.py)."""
        args = dict(locals())
        del args["self"]
        return self._run(args, CallState())

    def call_defaults(self) -> dict:
        params = inspect.signature(EditPipeline.__call__).parameters
        return {k: p.default for k, p in params.items() if k != "self"}

    def parse(self, args: dict) -> list:
        """The keyword arguments of a call -> one EditRequest per request (its photo loaded once per object)."""
        args = alias(args, "ip_adapter_image", "adapter_image")
        image, adapter_image, instruct = args["image"], args["adapter_image"], args["instruct"]
        if self.adapter is not None and adapter_image is None:
            raise EngineError("an adapter is loaded: give ip_adapter_image= (the reference image it reads)")
        photos = args["image"] if isinstance(args["image"], (list, tuple)) else None
        base = dict(args, image=adapter_image, instruct=instruct, instruct_guidance_scale=args["guidance_scale"],
                    guidance_mode="auto")
        n = len(photos) if photos is not None else None
        if n is not None:  # a photo list sets the number of requests like any other list
            base = {k: (v if isinstance(v, (list, tuple)) or k not in _PER_REQUEST else [v] * n)
                    for k, v in base.items()}
            if adapter_image is not None and not isinstance(adapter_image, (list, tuple)):
                base["image"] = [adapter_image] * n
            if not isinstance(instruct, (list, tuple)):
                base["instruct"] = [instruct] * n
        reqs = parse_requests(self, base)
        photos = list(photos) if photos is not None else [image] * len(reqs)
        if len(photos) != len(reqs):
            raise EngineError(f"per-request lists must have one length, got {len(photos)} images for {len(reqs)} "
                              "requests")
        loaded = {}
        for req, photo in zip(reqs, photos):
            if photo is None:
                raise EngineError("an image to edit is required (image=)")
            if id(photo) not in loaded:
                loaded[id(photo)] = load_image(photo)
        return [EditRequest(**{f.name: getattr(r, f.name) for f in fields(Request)}, photo=loaded[id(p)])
                for r, p in zip(reqs, photos)]

    def _size(self, reqs, height, width, max_size) -> tuple[int, int]:
        f = self.vae_scale_factor
        native = self.unet.config.sample_size * f
        if height is None and width is None:  # the photo's size, rounded down to the VAE grid (diffusers)
            sizes = {(p.height // f * f, p.width // f * f) for p in (r.photo for r in reqs)}
            if len(sizes) > 1:
                raise EngineError(f"the images of one call must round to one size, got {sorted(sizes)}: give "
                                  "height and width, or edit them in separate calls")
            height, width = sizes.pop()
            if height < f or width < f:
                raise EngineError(f"the image is smaller than the VAE's {f} px grid")
        return super()._size(reqs, height or native, width or native, max_size)  # (+ an export's own rules)

    def _plan(self, reqs) -> dict:
        branches, texts = [], set()
        for r, req in enumerate(reqs):
            for name, text, photo, w in edit_branches(req.guidance_scale, req.image_guidance_scale):
                src = {"prompt": req.prompt, "negative": req.negative_prompt}
                row = {"r": r, "w": w, "name": name, "text": src[text], "photo": photo,
                       # the adapter: conditioned on the text+image branch, unconditional elsewhere
                       "image": name == "text_image", "instruct": req.instruct if name == "text_image" else "",
                       "ip_prompt": req.prompt if name == "text_image" else req.negative_prompt}
                texts.add(row["text"])
                if self.adapter is not None and self.adapter.kind == "instruct":
                    texts.update((row["instruct"], row["ip_prompt"]))
                branches.append(row)
        return expand_rows(branches, texts, reqs)

    def _unet_inputs(self, text_rows, ip_rows, reqs, plan, call: CallState):
        text_rows, ctx = super()._unet_inputs(text_rows, ip_rows, reqs, plan, call)
        latents = call.photo_latents
        zero = torch.zeros_like(latents[:1])
        per_branch = torch.cat([latents, zero])
        pick = [b["r"] if b["photo"] else len(reqs) for b in plan["branches"]]
        rows = per_branch[torch.tensor(pick, device=self.device)].index_select(0, plan["branch_of_row"].to(self.device))
        return text_rows, EditContext(ctx, rows)

    def prepare(self, reqs: list, args: dict, call: CallState):
        """The photos' latents at the output size first (their own stage, into the call), then the rest."""
        height, width = self._size(reqs, args["height"], args["width"], args["max_size"])
        with call.timed("image_latent_ms", self.device):
            call.photo_latents = self.encode_photos(reqs, height, width)
        return super().prepare(reqs, {**args, "height": height, "width": width}, call)

    def encode_photos(self, reqs, height: int, width: int) -> torch.Tensor:
        """(requests, 4, h, w): each request's photo through diffusers' VaeImageProcessor (resize to the grid,
        [-1, 1]) and the VAE encoder's mode, unscaled; a photo shared by requests is encoded once."""
        from diffusers.image_processor import VaeImageProcessor

        proc = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        unique = {id(r.photo): r.photo for r in reqs}
        pixels = torch.cat([proc.preprocess(p, height=height, width=width) for p in unique.values()])
        pixels = pixels.to(self.device, self.dtype)
        latents = self.vae.encode(pixels).latent_dist.mode()
        slot = {key: i for i, key in enumerate(unique)}
        return latents[[slot[id(r.photo)] for r in reqs]]


_PER_REQUEST = ("prompt", "negative_prompt", "scale", "guidance_scale", "instruct_guidance_scale",
                "image_guidance_scale", "guidance_mode", "seed", "generator")
