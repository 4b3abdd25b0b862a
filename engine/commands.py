"""What each `python -m engine` command does, once engine/__main__.py has parsed and checked its flags.

Each command runs its cheap checks (output paths, sizes, images) first, then imports the heavy pipeline: torch,
diffusers and triton load only for a run that can go ahead.
"""
from __future__ import annotations

import logging
import os
import sys

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.loading import check_size, is_inpainting_model, load_image, native_size
from ipadapter_instruct.engine.output import output_paths, write_images
from ipadapter_instruct.engine.preflight import check_config, check_device
from ipadapter_instruct.engine.registry import EngineConfig, load_pipeline
from ipadapter_instruct.engine.server.config import ServerConfig
from ipadapter_instruct.engine.verbosity import quiet_libraries


def write_outputs(images, paths: list[str], overwrite: bool, params=None) -> int:
    """Write the images (PNGs with their parameters) and name the files on stdout, one line; the seeds used go to
    stderr, one line."""
    write_images(images, paths, overwrite=overwrite, params=params)
    print(" ".join(paths))
    seeds = getattr(images, "seeds", [])
    if seeds and None not in seeds:
        print(f"seed: {seeds[0]}" if len(seeds) == 1 else f"seeds: {' '.join(map(str, seeds))}", file=sys.stderr)
    return 0


def image_params(a, pipe, images, **extra) -> list[dict]:
    """Per image, the generation parameters its PNG carries (engine/pnginfo.py): the prompts as the pipeline read
    them, the seed that gives it back, and the settings the flags chose."""
    from ipadapter_instruct.engine.requests import default_prompts  # deferred: the pipeline's module (torch) is loaded
    prompts = {"prompt": a.prompt, "negative_prompt": a.negative_prompt}
    default_prompts(prompts, bool(a.adapter))
    scheduler = type(pipe.scheduler).__name__ if a.scheduler == "default" else a.scheduler
    common = dict(prompts, num_inference_steps=a.steps, scheduler=scheduler, guidance_scale=a.guidance_scale,
                  image_guidance_scale=a.image_guidance_scale, model=os.path.basename(os.path.normpath(a.model)),
                  instruct=a.instruct if a.adapter else None, **extra)
    return [dict(common, seed=seed, width=im.width, height=im.height) for im, seed in zip(images, images.seeds)]


def adapter_call_args(a) -> dict:
    """The generate flags of one request as Pipeline.__call__ takes them (several adapters: a list per adapter
    inside the request's entry)."""
    if not a.adapter:
        return {"image": None, "scale": 0.8}
    n = len(a.adapter)
    images = [load_image(p) for p in a.image]

    def per_adapter(values, default):
        if not values:
            return default
        return values[0] if len(values) == 1 else [list(values)]
    # one image for every adapter; else one per adapter, or (one adapter) several whose tokens are concatenated
    image = images[0] if len(images) == 1 else [images]
    masks = [None if m == "-" else load_image(m, "adapter mask") for m in a.adapter_mask]
    return {"image": image, "scale": per_adapter(a.scale, 0.8),
            "adapter_masks": None if not masks or all(m is None for m in masks) else
            (masks[0] if n == 1 else [masks]),
            "adapter_start": per_adapter(a.adapter_start, 0.0), "adapter_end": per_adapter(a.adapter_end, 1.0)}


def control_call_args(a) -> dict:
    """The ControlNet flags as Pipeline.__call__ takes them (one net: a single image and scale)."""
    if len(a.control_image) != len(a.controlnet) or len(a.controlnet_scale) not in (0, len(a.controlnet)):
        raise EngineError(f"give one --control-image (and at most one --controlnet-scale) per --controlnet: got "
                          f"{len(a.controlnet)} nets, {len(a.control_image)} images, {len(a.controlnet_scale)} scales")
    controls = [load_image(p, "control image") for p in a.control_image]
    if not controls:
        return {}
    scales = a.controlnet_scale or [1.0] * len(controls)
    return dict(control_image=controls[0] if len(controls) == 1 else controls,
                controlnet_conditioning_scale=scales if len(controls) > 1 else scales[0])


def start_call_args(a, native) -> dict:
    """--init-image, --mask and --strength as Pipeline.__call__ takes them (None strength: the task's default), the
    photo and mask read and checked here: found, one size, an img2img output (the photo's size) not over the limit;
    an inpainting model without them is one line. `native`: (native size, VAE factor), or None (a hub id)."""
    if is_inpainting_model(a.model, a.model_config) and (a.init_image is None or a.mask is None):
        raise EngineError(f"{a.model} is an inpainting model (its UNet reads a mask and a masked photo): give "
                          "--init-image PHOTO and --mask MASK (white is repainted, black kept)")
    if a.init_image is None:
        return {}
    photo = load_image(a.init_image, "init image (--init-image)")
    mask = None if a.mask is None else load_image(a.mask, "mask (--mask)").convert("L")
    if mask is not None and mask.size != photo.size:
        raise EngineError(f"--mask is {mask.width}x{mask.height} but --init-image is {photo.width}x{photo.height}: "
                          "the mask must be the photo's size")
    if mask is None and native is not None and a.height is None and a.width is None:
        f = native[1]
        check_size(max(photo.height // f * f, f), max(photo.width // f * f, f), *native, a.max_size)
    return {"init_image": photo, "mask_image": mask, "strength": a.strength}


def size_call_args(a, pipe) -> dict:
    """SDXL's size conditioning flags as Pipeline.__call__ takes them; an EngineError for any on another model."""
    sizes = {k: v for k, v in (("original_size", a.original_size), ("target_size", a.target_size),
                               ("crops_coords_top_left", a.crops_top_left)) if v is not None}
    if sizes and pipe.kind != "sdxl":
        raise EngineError("--original-size, --target-size and --crops-top-left are SDXL's size conditioning; "
                          f"{a.model} is not an SDXL model")
    return sizes


def cmd_generate(a) -> int:
    # the cheap checks, before torch loads: output paths, size, condition image
    paths = output_paths(a.out, a.num_images, a.overwrite)
    config = EngineConfig.from_args(a, kind="sd15")  # an SDXL model opens as sdxl by itself
    check_config(config, instruct=a.instruct)
    native = native_size(a.model, a.model_config)
    if native is not None:  # a hub id is checked by the pipeline once loaded
        check_size(a.height, a.width, *native, a.max_size)
    adapter_args = adapter_call_args(a)
    start_args = start_call_args(a, native)
    quiet_libraries(a.verbose)
    control_args = control_call_args(a)
    pipe = load_pipeline(config)
    pipe.set_progress_bar_config(disable=a.no_progress)
    images = pipe(prompt=a.prompt, **size_call_args(a, pipe), instruct=a.instruct, negative_prompt=a.negative_prompt,
                  **adapter_args, guidance_scale=a.guidance_scale, instruct_guidance_scale=a.instruct_guidance_scale,
                  image_guidance_scale=a.image_guidance_scale, guidance_mode=a.guidance_mode,
                  num_inference_steps=a.steps, height=a.height, width=a.width, num_images_per_prompt=a.num_images,
                  seed=a.seed, scheduler=a.scheduler, max_size=a.max_size, **control_args, **start_args)
    extra = dict(scale=adapter_args["scale"], instruct_guidance_scale=a.instruct_guidance_scale,
                 guidance_mode=a.guidance_mode) if a.adapter else {}
    if start_args:  # the strength the run used, as A1111 records it ("Denoising strength")
        extra["strength"] = pipe.STRENGTH["inpaint" if a.mask else "img2img"] if a.strength is None else a.strength
    return write_outputs(images, paths, a.overwrite, image_params(a, pipe, images, **extra))


def cmd_edit(a) -> int:
    # the cheap checks, before torch loads: output paths, the images, the adapter flags
    paths = output_paths(a.out, a.num_images, a.overwrite)
    given = [f for f, v in (("--image-encoder", a.image_encoder), ("--adapter-image", a.adapter_image)) if v is None]
    if a.adapter is not None and given:
        raise EngineError(f"--adapter needs {' and '.join(given)} too")
    if a.adapter is None and (a.image_encoder or a.adapter_image or a.instruct):
        raise EngineError("--image-encoder, --adapter-image and --instruct need --adapter")
    config = EngineConfig.from_args(a, kind="edit")
    check_config(config, instruct=a.instruct)
    photo = load_image(a.image)
    reference = load_image(a.adapter_image) if a.adapter_image else None
    quiet_libraries(a.verbose)
    pipe = load_pipeline(config)
    pipe.set_progress_bar_config(disable=a.no_progress)
    images = pipe(a.prompt, photo, a.negative_prompt, guidance_scale=a.guidance_scale,
                  image_guidance_scale=a.image_guidance_scale, num_inference_steps=a.steps, seed=a.seed,
                  scheduler=a.scheduler, num_images_per_prompt=a.num_images, height=a.height, width=a.width,
                  max_size=a.max_size, ip_adapter_image=reference, instruct=a.instruct, scale=a.scale)
    extra = {"scale": a.scale} if a.adapter else {}
    return write_outputs(images, paths, a.overwrite, image_params(a, pipe, images, **extra))


def cmd_demo(a) -> int:
    given = [a.model, a.image_encoder, a.adapter]
    if any(given) and not all(given):
        raise EngineError("give all of --model, --image-encoder and --adapter for real weights, "
                          "or none for the tiny ones")
    check_device(a.device)
    if all(given):
        check_config(EngineConfig.from_args(a, kind="sd15"))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    output_paths(a.out, 1, overwrite=True)  # the demo replaces its own files on every run
    image = load_image(a.image) if a.image else None
    quiet_libraries(a.verbose)
    # deferred: torch and diffusers, once the cheap checks passed
    from ipadapter_instruct.engine.demo import DEMO_INSTRUCT, cache_dir, draw_condition_image, ensure_tiny, run_demo

    random_weights = not all(given)
    if random_weights:  # the tiny set holds more (a CLIP for bench quality) than the pipeline takes
        tiny = ensure_tiny(a.cache or cache_dir())
        given = [tiny["model"], tiny["image_encoder"], tiny["adapter"]]
    model, image_encoder, adapter = given
    pipe = load_pipeline(EngineConfig.from_args(a, model=model, image_encoder=image_encoder, adapter=adapter,
                                                kind="sd15"))
    pipe.set_progress_bar_config(disable=True)
    run_demo(pipe, a.out, draw_condition_image() if image is None else image, random_weights, a.steps, a.seed,
             instruct=a.instruct or DEMO_INSTRUCT)
    return 0


def cmd_make_tiny(a) -> int:
    if a.sdxl and a.edit:
        print("error: make-tiny --sdxl writes an SDXL text-to-image model (not with --edit)", file=sys.stderr)
        return 2
    for flag, what, given in (("--edit", "an inpainting model", a.edit),
                              ("--sdxl", "an SD1.5-layout inpainting model", a.sdxl)):
        if a.inpaint and given:
            print(f"error: make-tiny --inpaint writes {what} (not with {flag})", file=sys.stderr)
            return 2
    if a.edit and a.controlnet:
        print("error: make-tiny --edit writes an InstructPix2Pix model, which takes no ControlNet (drop --controlnet)",
              file=sys.stderr)
        return 2
    quiet_libraries(a.verbose)
    from ipadapter_instruct.engine.tiny import make_tiny, make_tiny_sdxl, to_single_file  # deferred: torch and diffusers

    parts = dict(controlnet=not a.edit if a.controlnet is None else a.controlnet, lora=a.lora)
    if a.sdxl:  # a single file needs the encoders' widths unlike (the loader tells them apart by width, as in SDXL)
        paths = make_tiny_sdxl(a.dir, seed=a.seed, **({"text2_dim": 48} if a.single_file else {}), **parts)
    else:
        paths = make_tiny(a.dir, seed=a.seed, edit=a.edit, inpaint=a.inpaint, **parts)
    if a.single_file:
        paths["single_file"] = to_single_file(paths["model"],
                                              os.path.join(os.path.dirname(paths["model"]), "model.safetensors"))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_serve(a) -> int:
    check_device(a.device)
    if a.tiny:
        from ipadapter_instruct.engine.demo import cache_dir, ensure_tiny  # deferred: building the tiny weights needs torch
        tiny = ensure_tiny(cache_dir())
        a.model, a.image_encoder, a.adapter = tiny["model"], tiny["image_encoder"], tiny["adapter"]
    for what, path in (("model", a.model), ("image encoder", a.image_encoder), ("model config", a.model_config)):
        if path is not None and not os.path.isdir(path) and not (what == "model" and os.path.isfile(path)):
            raise EngineError(f"{what} folder not found: {path}")
    if a.adapter is not None and not os.path.isfile(a.adapter):
        raise EngineError(f"adapter file not found: {a.adapter}")
    config = ServerConfig.from_args(a)
    check_config(config)
    try:
        config.api_key()
    except (OSError, ValueError) as e:
        raise EngineError(f"--api-key-file: {e}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_libraries(a.verbose)
    if a.ray:
        from ipadapter_instruct.engine.server.ray_app import serve_ray  # deferred: Ray, an optional dependency
        return serve_ray(config, replicas=a.replicas, gpus_per_replica=a.gpus_per_replica)
    from ipadapter_instruct.engine.server.run import serve  # deferred: FastAPI, uvicorn and the pipeline
    return serve(config)


COMMANDS = {"generate": cmd_generate, "edit": cmd_edit, "demo": cmd_demo, "make-tiny": cmd_make_tiny,
            "serve": cmd_serve}
