"""Automatic1111's web UI API shape (/sdapi/v1/...), as bots, plugins, Open WebUI and the `webuiapi` client speak
it: a thin translation into the native request (schemas.GenerateRequest), run by routes.run_native through the same
checks, queue, batching and limits as POST /v1/generate, and the answer translated back.

- POST /sdapi/v1/txt2img and /sdapi/v1/img2img: A1111's body (prompt, seed -1 = random, steps, cfg_scale, width,
  height, batch_size x n_iter images, sampler_name, init_images, denoising_strength, mask), and ControlNet units in
  `alwayson_scripts.controlnet.args`: a unit whose module or model names an IP-Adapter drives the server's adapter
  (image, weight as scale, guidance_start/end as the adapter's step range, an optional `instruct`, else
  `serve --default-instruct`); any other unit drives the server's ControlNet by its folder name. A unit for a net the
  server has not loaded is a 422 naming it, never dropped. Answer: {"images", "parameters", "info" (a JSON string)}.
- GET /sdapi/v1/sd-models, /samplers, /options (read-only: POST is a 405), /scripts.
- Errors in A1111's shape, {"error", "detail", "body", "errors"} (plus "field", A1111's name of what is wrong, and
  "request_id"), with the native routes' status codes.
"""
from __future__ import annotations

import base64
import json
import re
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from ipadapter_instruct.engine.loading import SCHEDULERS
from ipadapter_instruct.engine.pnginfo import SAMPLERS, parameters_text
from ipadapter_instruct.engine.server.dependencies import authorize, engine_state
from ipadapter_instruct.engine.server.errors import ApiError
from ipadapter_instruct.engine.server.images import ImageRejected, from_base64
from ipadapter_instruct.engine.server.parsing import parse_json, raise_first
from ipadapter_instruct.engine.server.responses import encode_png
from ipadapter_instruct.engine.server.routes import check_serving, run_native
from ipadapter_instruct.engine.server.runners import own_name
from ipadapter_instruct.engine.server.schemas import MAX_NUM_IMAGES, GenerateRequest
from ipadapter_instruct.engine.server.shapes import shaped_route
from ipadapter_instruct.engine.server.state import ServerState

# A1111's sampler names for the engine's schedulers (engine/pnginfo.py's table), and the aliases A1111 lists
NAMES = {engine: SAMPLERS[engine] for engine in SCHEDULERS if engine in SAMPLERS}
CLASSES = {cls: engine for engine, cls in SCHEDULERS.items()}  # a model's own scheduler, as info names it
ALIASES = {"euler_a": ["k_euler_a", "k_euler_ancestral"], "euler": ["k_euler"], "dpmpp_2m": ["k_dpmpp_2m"],
           "lcm": ["k_lcm"]}
# A1111 fields that change the picture in ways this server does not serve: refused when set, never ignored
REFUSED = {"enable_hr": "hires fix", "restore_faces": "face restoration", "tiling": "tiling",
           "inpainting_mask_invert": "an inverted mask (send the mask white = repaint)"}
ADAPTER_WORDS = ("ip-adapter", "ip_adapter", "ipadapter")
HASH = re.compile(r"\s*\[[0-9a-fA-F]+\]$")  # A1111's " [d14c016b]" after a model's name
UNITS = "alwayson_scripts.controlnet.args"


def error_response(request: Request, e: ApiError) -> JSONResponse:
    """Every error on these routes (the API key's too) in A1111's shape, the native status code kept."""
    rid = request.scope.get("state", {}).get("request_id")
    body = {"error": e.code, "detail": e.message, "body": "", "errors": e.message, "field": e.field,
            "request_id": rid}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


router = APIRouter(prefix="/sdapi/v1", route_class=shaped_route(error_response),
                   dependencies=[Depends(authorize)])


@router.post("/txt2img")
async def txt2img(request: Request, state: ServerState = Depends(engine_state)):
    """A1111's txt2img; `denoising_strength` is hires fix's there (refused with enable_hr), so not read."""
    return await generate(request, state, photo=False)


@router.post("/img2img")
async def img2img(request: Request, state: ServerState = Depends(engine_state)):
    """A1111's img2img: init_images[0] the photo, denoising_strength its strength, `mask` an inpainting mask
    (white = repaint); mask_blur, inpainting_fill and inpaint_full_res are not served and not read."""
    return await generate(request, state, photo=True)


@router.get("/sd-models")
async def sd_models(state: ServerState = Depends(engine_state)):
    name = model_name(state)
    return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}]


@router.get("/samplers")
async def samplers():
    return [{"name": a1111, "aliases": [engine, *ALIASES.get(engine, [])], "options": {}}
            for engine, a1111 in NAMES.items()]


@router.get("/options")
async def options(state: ServerState = Depends(engine_state)):
    return {"sd_model_checkpoint": model_name(state), "sd_checkpoint_hash": None, "sd_vae": "Automatic",
            "samples_format": "png", "CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0,
            "default_instruct": state.config.default_instruct}


@router.post("/options")
async def set_options():
    raise ApiError(405, "method_not_allowed", "the options are read-only here: the server's settings are its "
                   "`serve` flags", headers={"allow": "GET"})


@router.get("/scripts")
async def scripts():
    return {"txt2img": ["controlnet"], "img2img": ["controlnet"]}


def model_name(state: ServerState) -> str:
    return own_name(state.config.model) or "model"


async def generate(request: Request, state: ServerState, photo: bool):
    check_serving(state, "generate")
    body = parse_json(await request.body(), "body")
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_json", "body must be a JSON object", "body")
    native, names = translate(body, state, photo)
    try:
        req = GenerateRequest.model_validate(native)
    except ValidationError as e:
        try:
            raise_first(e.errors())
        except ApiError as err:
            raise renamed(err, names) from None
    files = {}
    for field in ("ip_adapter_image", "control_image", "init_image", "mask_image"):
        if getattr(req, field) is not None:
            try:
                files[field] = from_base64(getattr(req, field))
            except ImageRejected as e:
                raise ApiError(e.status, e.code, str(e), names.get(field, field)) from None
    try:
        req, job, result = await run_native(state, request, "generate", req, files)
    except ApiError as e:
        raise renamed(e, names) from None
    answer = await run_in_threadpool(a1111_answer, body, job, result, photo)
    return JSONResponse(answer, headers={"x-seed": str(req.seed)})


def renamed(e: ApiError, names: dict) -> ApiError:
    """A native error's field as A1111's name for it (the message says both)."""
    if e.field not in names:
        return e
    return ApiError(e.status, e.code, f"{names[e.field]}: {e.message}", names[e.field], e.headers)


def translate(body: dict, state: ServerState, photo: bool) -> tuple[dict, dict]:
    """A1111's body -> (the native request's fields, {native field: A1111's name}); ApiError 422 naming A1111's."""
    for field, what in REFUSED.items():
        if body.get(field):
            raise ApiError(422, "invalid_request", f"{field}: {what} is not served here; send {field} false", field)
    if body.get("script_name"):
        raise ApiError(422, "invalid_request", "script_name: scripts are not served here (only the ControlNet "
                       "units of alwayson_scripts)", "script_name")
    native = {"scheduler": scheduler(body)}
    names = {"num_inference_steps": "steps", "guidance_scale": "cfg_scale", "num_images_per_prompt": "batch_size",
             "scheduler": "sampler_name", "seed": "seed", "ip_adapter_image": UNITS, "control_image": UNITS}
    for a1111, field in (("prompt", "prompt"), ("negative_prompt", "negative_prompt"), ("steps", "num_inference_steps"),
                         ("cfg_scale", "guidance_scale"), ("width", "width"), ("height", "height")):
        if body.get(a1111) is not None:
            native[field] = body[a1111]
    seed = body.get("seed")
    native["seed"] = None if seed is None or seed == -1 else seed
    native["num_images_per_prompt"] = images_asked(body)
    if photo:
        native.update(photo_fields(body, names))
    native.update(units(body, state, names))
    return native, names


def scheduler(body: dict) -> str:
    """sampler_name (else sampler_index) as the engine's scheduler, A1111's names or aliases (any case) or the
    engine's own; none given: the model's own. A1111's separate `scheduler` only as "automatic"."""
    name = body.get("sampler_name") or body.get("sampler_index")
    field = "sampler_name" if body.get("sampler_name") else "sampler_index"
    if body.get("scheduler") not in (None, "", "automatic", "Automatic"):
        raise ApiError(422, "invalid_request", f"scheduler: {body['scheduler']!r} is not served here; send "
                       "\"automatic\" (each sampler's own noise schedule)", "scheduler")
    if not name:
        return "default"
    if not isinstance(name, str):
        raise ApiError(422, "invalid_request", f"{field}: must be a sampler's name", field)
    for engine, a1111 in NAMES.items():
        if name.lower() in (a1111.lower(), engine, *ALIASES.get(engine, [])):
            return engine
    raise ApiError(422, "invalid_request", f"{field}: unknown sampler {name!r}; this server runs "
                   f"{', '.join(NAMES.values())} (GET /sdapi/v1/samplers)", field)


def images_asked(body: dict) -> int:
    """batch_size x n_iter images (A1111's seeds for them are seed + j, as the native route's); at most MAX."""
    size, n_iter = body.get("batch_size", 1), body.get("n_iter", 1)
    for name, value in (("batch_size", size), ("n_iter", n_iter)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ApiError(422, "invalid_request", f"{name}: must be a positive integer", name)
    if size * n_iter > MAX_NUM_IMAGES:
        raise ApiError(422, "invalid_request", f"batch_size: batch_size x n_iter is {size * n_iter}, over the "
                       f"{MAX_NUM_IMAGES} images one request may ask for", "batch_size")
    return size * n_iter


def photo_fields(body: dict, names: dict) -> dict:
    """img2img: init_images[0] -> init_image, denoising_strength -> strength, mask -> mask_image."""
    photos = body.get("init_images")
    if not isinstance(photos, list) or len(photos) != 1 or not isinstance(photos[0], str):
        raise ApiError(422, "invalid_request", "init_images: send one photo (a list of one base64 image)",
                       "init_images")
    names.update(init_image="init_images", strength="denoising_strength", mask_image="mask")
    out = {"init_image": photos[0], "strength": body.get("denoising_strength", 0.75)}
    if body.get("mask"):
        out["mask_image"] = body["mask"]
    return out


def script_units(body: dict) -> list:
    """The ControlNet units (alwayson_scripts' "controlnet" in any case); another script with arguments: 422."""
    scripts = body.get("alwayson_scripts") or {}
    if not isinstance(scripts, dict):
        raise ApiError(422, "invalid_request", "alwayson_scripts: must be an object", "alwayson_scripts")
    found = []
    for name, script in scripts.items():
        args = script.get("args") if isinstance(script, dict) else None
        if name.lower() == "controlnet":
            if not isinstance(args, list):
                raise ApiError(422, "invalid_request", f"{UNITS}: must be a list of units", UNITS)
            found += args
        elif args and args != [False]:
            raise ApiError(422, "invalid_request", f"alwayson_scripts.{name}: this server runs only ControlNet "
                           "units (IP-Adapter and the server's ControlNet)", f"alwayson_scripts.{name}")
    return found


def units(body: dict, state: ServerState, names: dict) -> dict:
    """The enabled units as native fields: one IP-Adapter unit (the server's adapter), one ControlNet unit (the
    server's net, by its folder name)."""
    out, seen = {}, {}
    for i, unit in enumerate(script_units(body)):
        at = f"{UNITS}[{i}]"
        if not isinstance(unit, dict):
            raise ApiError(422, "invalid_request", f"{at}: a unit must be an object", at)
        if unit.get("enabled", True) is False:
            continue
        words = f"{unit.get('module') or ''} {unit.get('model') or ''}".lower()
        kind = "adapter" if any(w in words for w in ADAPTER_WORDS) else "controlnet"
        if kind in seen:
            raise ApiError(422, "invalid_request", f"{at}: a second {kind} unit (after {seen[kind]}); this server "
                           f"runs one", at)
        seen[kind] = at
        out.update(adapter_unit(unit, at, state, names) if kind == "adapter" else
                   controlnet_unit(unit, at, state, names))
    return out


def unit_image(unit: dict, at: str) -> str | None:
    image = unit.get("image") or unit.get("input_image")
    if isinstance(image, dict):  # the extension's older {"image": ..., "mask": ...}
        image = image.get("image")
    if image is not None and not isinstance(image, str):
        raise ApiError(422, "invalid_request", f"{at}.image: must be a base64 image", f"{at}.image")
    return image or None


def adapter_unit(unit: dict, at: str, state: ServerState, names: dict) -> dict:
    names.update(ip_adapter_image=f"{at}.image", scale=f"{at}.weight", adapter_start=f"{at}.guidance_start",
                 adapter_end=f"{at}.guidance_end", instruct=f"{at}.instruct")
    instruct = unit.get("instruct")
    if instruct is None and state.runner.kind == "instruct":
        instruct = state.config.default_instruct
    return {"ip_adapter_image": unit_image(unit, at), "scale": unit.get("weight", 1.0), "instruct": instruct,
            "adapter_start": unit.get("guidance_start", 0.0), "adapter_end": unit.get("guidance_end", 1.0)}


def controlnet_unit(unit: dict, at: str, state: ServerState, names: dict) -> dict:
    loaded = [own_name(p) for p in state.config.controlnet]
    model = HASH.sub("", str(unit.get("model") or ""))
    if model not in loaded:
        has = f"it has loaded {', '.join(loaded)}" if loaded else "it has loaded none"
        raise ApiError(422, "invalid_request", f"{at}.model: this server has no ControlNet named {model!r} ({has}; "
                       "an IP-Adapter unit names ip-adapter in its module or model)", f"{at}.model")
    if (unit.get("module") or "none").lower() not in ("none", ""):
        raise ApiError(422, "invalid_request", f"{at}.module: preprocessors are not run here; send the control "
                       "image itself with module \"none\"", f"{at}.module")
    names.update(control_image=f"{at}.image", controlnet_conditioning_scale=f"{at}.weight",
                 control_guidance_start=f"{at}.guidance_start", control_guidance_end=f"{at}.guidance_end")
    return {"control_image": unit_image(unit, at), "controlnet_conditioning_scale": unit.get("weight", 1.0),
            "control_guidance_start": unit.get("guidance_start", 0.0),
            "control_guidance_end": unit.get("guidance_end", 1.0)}


def sampler_name(scheduler: str) -> str:
    """The engine's scheduler name (or a model's own scheduler class) as A1111's sampler name."""
    engine = CLASSES.get(scheduler, scheduler)
    return NAMES.get(engine, engine)


def a1111_answer(body: dict, job, result: dict, photo: bool) -> dict:
    """{"images": base64 PNGs (each with its "parameters" chunk), "parameters": the request as received (without
    its photo and mask, as A1111 answers), "info": a JSON string as A1111's}."""
    work, params = job.payload, result["params"]
    images = [base64.b64encode(encode_png(result, j)).decode() for j in range(len(params))]
    first = params[0]
    info = {"prompt": first.get("prompt"), "all_prompts": [p.get("prompt") for p in params],
            "negative_prompt": first.get("negative_prompt"),
            "all_negative_prompts": [p.get("negative_prompt") for p in params],
            "seed": result["seeds"][0], "all_seeds": result["seeds"], "subseed": -1, "all_subseeds":
            [-1] * len(params), "subseed_strength": 0, "width": work.width, "height": work.height,
            "sampler_name": sampler_name(first["scheduler"]), "cfg_scale": work.req.guidance_scale,
            "steps": work.req.num_inference_steps, "batch_size": len(params), "restore_faces": False,
            "sd_model_name": first.get("model"), "sd_model_hash": None, "denoising_strength":
            first.get("strength") if photo else None, "extra_generation_params":
            {k: first[k] for k in ("instruct", "scale") if first.get(k) is not None},
            "index_of_first_image": 0, "infotexts": [parameters_text(p) for p in params], "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
            "is_using_inpainting_conditioning": False, "version": "ipadapter-instruct"}
    parameters = dict(body, **({"init_images": None, "mask": None} if photo else {}))
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}
