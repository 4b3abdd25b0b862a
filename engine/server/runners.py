"""Between the batcher and the pipeline: what a request costs (UNet rows), which requests can share a call, the
checks that need the loaded model, and one `Pipeline` call for a batch of requests."""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import Image

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.combine import NonFinite
from ipadapter_instruct.engine.guidance import resolve_mode
from ipadapter_instruct.engine.img2img import inpainting_unet
from ipadapter_instruct.engine.loading import MAX_SIZE_FACTOR, check_size, native_from_configs
from ipadapter_instruct.engine.prepared import SIZE_CONDITIONING
from ipadapter_instruct.engine.requests import check_instruction, check_per_row_adapter, default_prompts
from ipadapter_instruct.engine.server import photos
from ipadapter_instruct.engine.server.errors import FieldError
from ipadapter_instruct.engine.server.images import Use
from ipadapter_instruct.engine.server.schemas import GenerateRequest

log = logging.getLogger(__name__)
BRANCH_ROWS = {"none": 1, "simple": 2, "full": 4}
STAGES = ("text_encoder_ms", "image_encoder_ms", "projector_ms", "kv_ms", "denoise_ms", "unet_ms_per_step",
          "vae_decode_ms", "total_ms")


SDXL_FIELDS = SIZE_CONDITIONING  # per call, SDXL only


def own_name(path) -> str | None:
    """A folder's or file's own name: where the weights lie on the server is not the client's."""
    return os.path.basename(os.path.normpath(path)) if path else None


def names(paths) -> list[str]:
    """Own names of one path or several (None: none)."""
    paths = [paths] if isinstance(paths, str) else list(paths or ())
    return [own_name(p) for p in paths]


@contextmanager
def as_field(field: str):
    """The engine's own check of a value (engine/requests.py), its refusal answered as that field's 422."""
    try:
        yield
    except FieldError:
        raise
    except EngineError as e:
        raise FieldError(field, str(e)) from None


@dataclass
class Work:
    """One request as the worker runs it: the validated body and the decoded condition image."""
    req: GenerateRequest
    image: Image.Image | None
    height: int
    width: int
    rows: int   # UNet rows in a call: guidance branches x images
    control: Image.Image | None = None  # the ControlNet's input (a server started with --controlnet)
    mask: Image.Image | None = None     # where the adapter acts (adapter_mask)
    start: object = None                # engine.img2img.Start: the photo (init_image, mask_image, strength) or None
    first_step: int = 0                 # the step it starts at (a photo's strength skips the first ones)


class PipelineRunner:
    task = "generate"  # POST /v1/generate; EditRunner: /v1/edit
    adapter_params = ("scale", "instruct_guidance_scale", "guidance_mode")  # in a PNG's parameters with an adapter

    def __init__(self, pipe, max_size: int | None = None, model: str | None = None):
        self.pipe, self.max_size = pipe, max_size  # max_size: `serve --max-size` (None: native x MAX_SIZE_FACTOR)
        # the model's name in the PNGs' parameters: `serve --model`'s, else the folder the UNet was read from
        self.model = own_name(model or getattr(pipe.unet.config, "_name_or_path", None))
        self.caps = pipe.capabilities
        self.kind = pipe.adapter.kind if pipe.adapter is not None else None
        self.native, self.factor = native_from_configs(pipe.unet.config, pipe.vae.config)
        self.created = int(time.time())  # /v1/models' `created` (OpenAI's field): when this server loaded it

    def prepare(self, req: GenerateRequest, image: Image.Image | None, control: Image.Image | None = None,
                mask: Image.Image | None = None, init_image: Image.Image | None = None,
                mask_image: Image.Image | None = None) -> Work:
        """The checks that need the model, before the request is queued; raises FieldError."""
        nets = self.caps.controlnets
        if nets and control is None:
            raise FieldError("control_image", "this server runs a ControlNet: control_image is required")
        if not nets and (control is not None or req.controlnet_conditioning_scale != 1.0):
            raise FieldError("control_image", "this server runs no ControlNet: send no control_image")
        start, first_step = photos.check(self, req, init_image, mask_image)
        height, width = req.height, req.width
        from_photo = start is not None and start.mask is None and height is None and width is None
        if from_photo:  # img2img: the photo's size on the VAE grid, as the pipeline takes it
            f = self.factor
            height, width = init_image.height // f * f, init_image.width // f * f
        try:
            height, width = self._size(height, width)
        except EngineError as e:
            raise FieldError("init_image" if from_photo else "height" if req.height is not None else "width",
                             str(e)) from None
        if self.kind is None:
            if image is not None:
                raise FieldError("ip_adapter_image", "this server has no adapter loaded: send no ip_adapter_image")
            if req.instruct:
                raise FieldError("instruct", "this server has no adapter loaded: send no instruction")
            for name, off in (("adapter_mask", mask is None), ("adapter_start", req.adapter_start == 0.0),
                              ("adapter_end", req.adapter_end == 1.0)):
                if not off:
                    raise FieldError(name, f"this server has no adapter loaded: send no {name}")
            if req.prompt is None:  # (with an adapter the pipeline's default prompt applies)
                raise FieldError("prompt", "this server has no adapter loaded (text to image): a prompt is required")
        else:
            field = "adapter_mask" if mask is not None else "adapter_start" if req.adapter_start else "adapter_end"
            with as_field(field):
                check_per_row_adapter(self.caps, mask is not None, req.adapter_start, req.adapter_end)
            if image is None:
                raise FieldError("ip_adapter_image", "an adapter is loaded: ip_adapter_image, the reference "
                                 "image, is required (base64 PNG, JPEG or WebP)")
            if self.kind == "instruct":
                with as_field("instruct"):
                    check_instruction(req.instruct)
        if isinstance(req.scale, dict) and not self.caps.per_row_adapter:  # exported graphs: one strength per row
            raise FieldError("scale", f"this server runs {self.caps.runtime} graphs, which "
                                      "takes one adapter strength per request (a number), not per-block scales")
        if isinstance(req.scale, dict):
            from ipadapter_instruct.engine.attention import expand_scale
            try:
                expand_scale(self.pipe.unet, list(self.pipe.cross), req.scale)
            except (EngineError, ValueError, TypeError, KeyError) as e:
                raise FieldError("scale", f"bad per-block scale: {e}") from None
        if not self.caps.size_conditioning:
            for name in SDXL_FIELDS:
                if getattr(req, name, None) is not None:
                    raise FieldError(name, f"{name} is SDXL's size conditioning; this server loads an SD1.5 model")
        try:
            mode = resolve_mode(req.guidance_mode, req.instruct, req.guidance_scale, self.kind == "instruct")
        except EngineError as e:
            raise FieldError("guidance_mode", str(e)) from None
        return Work(req, image, height, width, BRANCH_ROWS[mode] * req.num_images_per_prompt, control, mask, start,
                    first_step)

    def uses(self, req) -> dict[str, Use | None]:
        """The size each image field is used at, so the server decodes it no larger: the condition image at CLIP's
        input size, the control image and the mask at the output size (None: a size prepare() will refuse), a photo
        and its mask as photos.uses says."""
        out = self._output_use(req.height, req.width)
        return {"ip_adapter_image": self._clip_use(), "control_image": out, "adapter_mask": out,
                **photos.uses(self, req)}

    def _size(self, height, width) -> tuple[int, int]:
        """check_size with the server's limit, its refusal naming the server's flag."""
        return check_size(height, width, self.native, self.factor, self.max_size, flag="serve --max-size")

    def _output_use(self, height, width) -> Use | None:
        try:
            height, width = self._size(height, width)
        except EngineError:
            return None
        return Use(width=width, height=height)  # VaeImageProcessor's resize: exact size, Lanczos

    def _clip_use(self) -> Use | None:
        proc = getattr(self.pipe, "image_processor", None)
        size = getattr(proc, "size", None)
        short = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
        if not short or not getattr(proc, "do_resize", True):
            return None
        return Use(short=int(short), resample=int(getattr(proc, "resample", Image.Resampling.BICUBIC)))

    @staticmethod
    def key(work: Work) -> tuple:
        """Requests with equal keys can share one Pipeline call."""
        r = work.req
        control = (getattr(r, "control_guidance_start", 0.0), getattr(r, "control_guidance_end", 1.0),
                   getattr(r, "guess_mode", False))  # per call in the pipeline
        sdxl = tuple(tuple(v) if v is not None else None for v in (getattr(r, n, None) for n in SDXL_FIELDS))
        start = work.first_step  # a photo's strength: the step its schedule starts at (text to image: 0)
        return (work.height, work.width, r.num_inference_steps, start, r.scheduler, r.num_images_per_prompt, *control,
                sdxl)

    def __call__(self, works: list[Work], progress=None) -> list[dict]:
        """One Pipeline call for requests of one key -> per request its result (`answer`)."""
        return self._run(works, progress, STAGES)

    def _run(self, works: list[Work], progress, stages: tuple) -> list:
        """One Pipeline call -> per request its result dict, or the error of a request that failed alone (its
        latents went non-finite: guidance.NonFinite) while the others' images stand."""
        kwargs = self._kwargs(works, progress)
        t0 = time.perf_counter()
        try:
            images, failed = self.pipe(**kwargs), set()
        except NonFinite as e:
            images, failed = e.outputs, set(e.requests)
        timings = {k: round(v, 3) for k, v in self.pipe.timings.items() if k in stages}
        timings["compute_ms"] = (time.perf_counter() - t0) * 1e3
        n = works[0].req.num_images_per_prompt
        seeds = getattr(images, "seeds", None) or [  # (NonFinite's outputs are a plain list)
            None if w.req.seed is None else w.req.seed + j for w in works for j in range(n)]
        return [NonFinite.alone() if i in failed else
                self.answer(w, images[i * n:(i + 1) * n], seeds[i * n:(i + 1) * n], timings)
                for i, w in enumerate(works)]

    def answer(self, work: Work, images: list, seeds: list, timings: dict) -> dict:
        """One request's result: {"images": [PIL], "seeds": [one per image: seed + j], "params": [per image, what its
        PNG carries (engine/pnginfo.py)], "timings": {...}}."""
        r = work.req
        prompts = {"prompt": r.prompt, "negative_prompt": r.negative_prompt}
        default_prompts(prompts, self.kind is not None)  # as the pipeline read them (engine/commands.py image_params)
        scheduler = type(self.pipe.scheduler).__name__ if r.scheduler == "default" else r.scheduler
        adapter = {k: getattr(r, k) for k in self.adapter_params} if self.kind else {}
        common = dict(prompts, num_inference_steps=r.num_inference_steps, scheduler=scheduler,
                      guidance_scale=r.guidance_scale, image_guidance_scale=r.image_guidance_scale, model=self.model,
                      instruct=r.instruct if self.kind else None, **adapter,
                      strength=None if work.start is None else work.start.strength)  # (from a photo)
        params = [dict(common, seed=s, width=im.width, height=im.height) for im, s in zip(images, seeds)]
        return {"images": images, "seeds": list(seeds), "params": params, "timings": timings}

    # step-level batching (stepper.py): one request admitted, stepped with others, finished
    def start(self, work: Work, progress=None):
        return self.pipe.start(**self._kwargs([work], progress))

    def start_many(self, works: list[Work], progress: list) -> list:
        """Requests of one key admitted together: one batch of their encoder and projector work -> a flight each."""
        return self.pipe.start_many(**self._kwargs(works, list(progress)))

    def step(self, flights: list, packer) -> None:
        from ipadapter_instruct.engine.stepping import step
        step(self.pipe, flights, packer)

    def finish(self, work: Work, flight) -> dict:
        return self.finish_many([work], [flight])[0]

    def finish_many(self, works: list[Work], flights: list) -> list[dict]:
        """Finished flights decoded in one VAE call -> per request its result (`answer`)."""
        try:
            outputs, failed = self.pipe.finish_many(flights), set()
        except NonFinite as e:  # those flights fail alone; the others' images stand
            outputs, failed = e.outputs, set(e.requests)
        now, out = time.perf_counter(), []
        for k, (work, images, flight) in enumerate(zip(works, outputs, flights)):
            stages = {k: round(v, 3) for k, v in flight.timings.items() if k in STAGES or k == "prepare_ms"}
            stages["compute_ms"] = (now - flight.started) * 1e3
            out.append(NonFinite.alone() if k in failed else self.answer(work, images, flight.seeds, stages))
        return out

    def _kwargs(self, works: list[Work], progress=None) -> dict:
        first = works[0].req
        per = {k: [getattr(w.req, k) for w in works] for k in (
            "prompt", "negative_prompt", "scale", "guidance_scale", "instruct_guidance_scale",
            "image_guidance_scale", "guidance_mode", "seed", "adapter_start", "adapter_end")}
        kwargs = dict(per, num_inference_steps=first.num_inference_steps, height=works[0].height,
                      width=works[0].width, num_images_per_prompt=first.num_images_per_prompt,
                      scheduler=first.scheduler, max_size=self.max_size, progress_callback=progress)
        if self.kind is not None:
            kwargs["image"] = [w.image for w in works]
            kwargs["instruct"] = [w.req.instruct for w in works]
            if any(w.mask is not None for w in works):
                kwargs["adapter_masks"] = [w.mask for w in works]
        else:
            del kwargs["adapter_start"], kwargs["adapter_end"]
        if any(w.start is not None for w in works):  # per request; text-to-image ones send None
            kwargs.update(init_image=[w.start and w.start.photo for w in works],
                          strength=[w.start and w.start.strength for w in works])
            if any(w.start is not None and w.start.mask is not None for w in works):
                kwargs["mask_image"] = [w.start and w.start.mask for w in works]
        if self.caps.size_conditioning:  # per call, as the key groups them
            kwargs.update({n: tuple(getattr(first, n)) for n in SDXL_FIELDS if getattr(first, n, None) is not None})
        if self.caps.controlnets:
            kwargs.update(control_image=[w.control for w in works],
                          controlnet_conditioning_scale=[w.req.controlnet_conditioning_scale for w in works],
                          control_guidance_start=first.control_guidance_start,
                          control_guidance_end=first.control_guidance_end, guess_mode=first.guess_mode)
        return kwargs

    def describe(self, config) -> dict:
        """What /v1/models reports."""
        from ipadapter_instruct.engine.loading import SCHEDULERS
        pipe = self.pipe
        base = own_name(config.model) or "model"
        return {"id": base, "base": base, "adapter": own_name(config.adapter), "adapter_kind": self.kind,
                "image_encoder": own_name(config.image_encoder), "dtype": str(pipe.dtype).replace("torch.", ""),
                "device": str(pipe.device), "attention_backend": pipe.attention_backend,
                "native_size": self.native, "vae_scale_factor": self.factor,
                "schedulers": ["default", *SCHEDULERS], "task": self.task, "inpainting": inpainting_unet(pipe),
                "object": "model", "created": self.created, "owned_by": "ipadapter-instruct",
                "ipadapter_instruct": {"task": self.task, "adapters": self.parts(self.caps.adapters, config.adapter),
                                       "controlnets": self.parts(("controlnet",) * self.caps.controlnets,
                                                                 config.controlnet),
                                       "loras": names([lora[0] for lora in config.lora])}}

    @staticmethod
    def parts(kinds: tuple, paths) -> list[dict]:
        """The loaded adapters (or ControlNets) as [{kind, name}], the name None when the pipeline came built."""
        given = names(paths)
        return [{"kind": kind, "name": given[i] if i < len(given) else None} for i, kind in enumerate(kinds)]

    def warmup_work(self) -> Work:
        """One 1-step request at the native size: kernels, allocator and caches ready before /ready."""
        grey = Image.new("RGB", (64, 64), (127, 127, 127))
        instruct = "everything" if self.kind == "instruct" else None
        prompt = None if self.kind else "warm up"  # (text to image needs one)
        inpaint = {}
        if inpainting_unet(self.pipe):  # an inpainting model runs only from a photo and a mask
            photo = Image.new("RGB", (self.native, self.native), (127, 127, 127))
            inpaint = {"init_image": photo, "mask_image": photo}
        return self.prepare(GenerateRequest(prompt=prompt, num_inference_steps=1, instruct=instruct),
                            grey if self.kind else None,
                            grey if self.caps.controlnets else None, **inpaint)


@dataclass
class EditWork(Work):
    """An edit as the worker runs it: `image` is the photo; `reference` what an adapter reads."""
    reference: Image.Image | None = None


class EditRunner(PipelineRunner):
    """The runner of an InstructPix2Pix server (engine.EditPipeline): POST /v1/edit."""

    task = "edit"
    adapter_params = ("scale",)

    def uses(self, req) -> dict[str, Use | None]:
        """The photo at the output size (its own size on the VAE grid without height/width), the reference at
        CLIP's input size."""
        photo = self._output_use(req.height, req.width) if req.height or req.width else \
            Use(grid=self.factor, max_side=self.max_size or self.native * MAX_SIZE_FACTOR)
        return {"image": photo, "ip_adapter_image": self._clip_use()}

    def prepare(self, req, images: dict) -> EditWork:
        photo, reference = images.get("image"), images.get("ip_adapter_image")
        if photo is None:
            raise FieldError("image", "the photo to edit is required (base64 PNG, JPEG or WebP, or a file part)")
        f = self.factor
        height, width = req.height, req.width
        if height is None and width is None:  # the photo's size on the VAE grid, as the pipeline takes it
            height, width = photo.height // f * f, photo.width // f * f
        try:
            height, width = self._size(height, width)
        except EngineError as e:
            raise FieldError("height" if req.height is not None else "image", str(e)) from None
        if self.kind is None and (reference is not None or req.instruct):
            raise FieldError("ip_adapter_image" if reference is not None else "instruct",
                             "this server has no adapter loaded: send no ip_adapter_image or instruct")
        if self.kind is not None:
            if reference is None:
                raise FieldError("ip_adapter_image", "an adapter is loaded: ip_adapter_image, the reference image, "
                                 "is required")
            if self.kind == "instruct" and not (req.instruct or "").strip():
                raise FieldError("instruct", "instruction is empty: say what to take from the reference image")
        from ipadapter_instruct.engine.edit import edit_branches
        rows = len(edit_branches(req.guidance_scale, req.image_guidance_scale)) * req.num_images_per_prompt
        return EditWork(req, photo, height, width, rows, reference=reference)  # (control and mask come first)

    def _kwargs(self, works: list[EditWork], progress=None) -> dict:
        first = works[0].req
        per = {k: [getattr(w.req, k) for w in works] for k in (
            "prompt", "negative_prompt", "guidance_scale", "image_guidance_scale", "seed")}
        kwargs = dict(per, image=[w.image for w in works], num_inference_steps=first.num_inference_steps,
                      height=works[0].height, width=works[0].width, num_images_per_prompt=first.num_images_per_prompt,
                      scheduler=first.scheduler, max_size=self.max_size, progress_callback=progress)
        if self.kind is not None:
            kwargs.update(adapter_image=[w.reference for w in works], instruct=[w.req.instruct for w in works],
                          scale=[w.req.scale for w in works])
        return kwargs

    def __call__(self, works: list[EditWork], progress=None) -> list[dict]:
        return self._run(works, progress, (*STAGES, "image_latent_ms"))

    def warmup_work(self) -> EditWork:
        from ipadapter_instruct.engine.server.schemas import EditRequest
        grey = Image.new("RGB", (self.native, self.native), (127, 127, 127))
        images = {"image": grey, **({"ip_adapter_image": grey} if self.kind else {})}
        instruct = "everything" if self.kind == "instruct" else None
        return self.prepare(EditRequest(prompt="warm up", num_inference_steps=1, instruct=instruct), images)
