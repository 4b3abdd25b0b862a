"""python -m engine {generate, edit, make-tiny, demo, serve}: the command-line contract (README, "CLI").

Arguments, output paths, sizes and the condition image are checked before torch, diffusers or triton is
imported, so `--help` and every bad argument answer at once, and nothing heavy loads for a run that would fail.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from kernels import BACKENDS

from . import DEFAULT_NEGATIVE, DEFAULT_PROMPT, DTYPE_NAMES, RUNTIMES
from .errors import EngineError
from .guidance import MODES
from .interrupt import EXIT_INTERRUPTED, INTERRUPTED, interrupt_guard, interruptible  # noqa: F401 (tests use all)
from .loading import SCHEDULERS, check_size, load_image, native_size
from .output import output_paths, write_images
from .trt import CHOICES as TRT_CHOICES


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (exit 2), like every other error here."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def int_pair(text: str) -> tuple[int, int]:
    """'H,W' (or 'T,L') -> two non-negative integers, for SDXL's size conditioning."""
    parts = text.split(",")
    try:
        pair = tuple(int(p) for p in parts)
    except ValueError:
        pair = ()
    if len(pair) != 2 or min(pair) < 0:
        raise argparse.ArgumentTypeError(f"expected two non-negative integers as A,B, got {text!r}")
    return pair


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def lora_arg(text: str) -> tuple[str, float]:
    """--lora FILE[:SCALE] -> (FILE, SCALE); SCALE defaults to 1."""
    path, sep, scale = text.rpartition(":")
    if not sep:
        return text, 1.0
    try:
        return path, float(scale)
    except ValueError:
        if "/" in scale or "." in scale:  # a path with a colon in it, no scale
            return text, 1.0
        raise argparse.ArgumentTypeError(f"expected FILE or FILE:SCALE with a number, got {text!r}") from None


def add_lora_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", type=lora_arg, action="append", default=[], metavar="FILE[:SCALE]",
                   help="a LoRA (diffusers, kohya or A1111 .safetensors) at SCALE (default 1), fused into the "
                        "weights; repeatable")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), default=None, help="default: float16 on cuda, float32 on cpu")
    p.add_argument("--attention-backend", choices=list(BACKENDS), default="auto",
                   help="cross-attention: the fused Triton kernel, two SDPA calls, or the plain reference "
                        "(auto: triton on CUDA, sdpa elsewhere)")
    p.add_argument("--backend", choices=list(RUNTIMES), default="pytorch",
                   help="what runs the model: pytorch, or tensorrt (the .plan files of `python -m export trt`, "
                        "given with --engines; a CUDA GPU TensorRT supports)")
    p.add_argument("--engines", default=None, metavar="DIR",
                   help="with --backend tensorrt: the folder `python -m export trt --out DIR` wrote")
    p.add_argument("--trt", choices=TRT_CHOICES, default="auto",
                   help="with --backend tensorrt: which TensorRT loads the plans: auto (the one that built them, as "
                        "engines.json says), full (`import tensorrt`) or rtx (TensorRT for RTX), which must be it")
    p.add_argument("--no-verify-fast-path", dest="verify_fast_path", action="store_false",
                   help="skip the first-use check of each fused kernel, CUDA-graph replay and compiled UNet against "
                        "its eager path (on by default: one extra eager call per new shape, with a fallback where "
                        "the fast path fails)")


def build_parser() -> Parser:
    parser = Parser(prog="python -m engine", description="IPAdapter-Instruct generation on Stable Diffusion 1.5")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    g = sub.add_parser("generate", help="generate images from a prompt, and optionally a condition image and an "
                                        "instruction (with --adapter)")
    g.add_argument("--model", required=True, help="diffusers SD1.5 folder (or hub id), or a single-file checkpoint "
                                                  "(.safetensors/.ckpt, original layout)")
    g.add_argument("--model-config", metavar="DIR",
                   help="with a single-file --model: a local diffusers folder to take the configs, tokenizer and "
                        "scheduler from (default: the SD1.5 / InstructPix2Pix ones shipped with the package)")
    g.add_argument("--image-encoder", help="CLIPVisionModelWithProjection folder (with --adapter)")
    g.add_argument("--adapter", action="append", default=[], metavar="FILE",
                   help="two-key adapter file (.bin or .safetensors); repeatable: several adapters act together; "
                        "without it: text to image")
    g.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="condition image (with --adapter); repeatable: one per --adapter, or with one adapter "
                        "several images whose tokens are concatenated")
    g.add_argument("--prompt", default=DEFAULT_PROMPT)
    g.add_argument("--negative-prompt", default=DEFAULT_NEGATIVE)
    g.add_argument("--instruct", default=None, help="what to take from the image (required by IPAdapter-Instruct)")
    g.add_argument("--scale", type=float, action="append", default=[], metavar="F",
                   help="adapter strength (default 0.8; 0 = base model); repeatable: one per --adapter")
    g.add_argument("--adapter-mask", action="append", default=[], metavar="PATH",
                   help="where an adapter acts (white) in the output, as diffusers' IPAdapterMaskProcessor reads it; "
                        "one per --adapter, '-' for none")
    g.add_argument("--adapter-start", type=float, action="append", default=[], metavar="F",
                   help="fraction of the steps where the adapter begins to act (default 0; one, or one per --adapter)")
    g.add_argument("--adapter-end", type=float, action="append", default=[], metavar="F",
                   help="fraction of the steps where it stops (default 1; one, or one per --adapter)")
    g.add_argument("--guidance-scale", type=float, default=6.0)
    g.add_argument("--instruct-guidance-scale", type=float, default=6.0)
    g.add_argument("--image-guidance-scale", type=float, default=1.0)
    g.add_argument("--guidance-mode", choices=list(MODES), default="auto")
    g.add_argument("--steps", type=positive_int, default=30)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--height", type=positive_int, default=None, help="default: the model's native size")
    g.add_argument("--width", type=positive_int, default=None)
    g.add_argument("--max-size", type=positive_int, default=None,
                   help="largest height/width accepted (default: the model's native size x 4, 2048 for SD1.5)")
    g.add_argument("--num-images", type=positive_int, default=1)
    g.add_argument("--scheduler", choices=["default", *SCHEDULERS], default="default")
    for flag, what in (("--original-size", "H,W (default: the output size)"),
                       ("--target-size", "H,W (default: the output size)"), ("--crops-top-left", "T,L (default 0,0)")):
        g.add_argument(flag, type=int_pair, default=None, metavar=what.split()[0],
                       help=f"SDXL models only: size conditioning, {what}")
    g.add_argument("--controlnet", action="append", default=[], metavar="DIR",
                   help="a diffusers ControlNetModel folder (repeatable: one --control-image each, in order)")
    g.add_argument("--control-image", action="append", default=[], metavar="PATH", help="the ControlNet's input")
    g.add_argument("--controlnet-scale", type=float, action="append", default=[], metavar="F",
                   help="conditioning scale (default 1; repeatable: one per --controlnet)")
    add_lora_arg(g)
    add_runtime_args(g)
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g.add_argument("--out", required=True, help="PATH.png, .jpg, .jpeg or .webp (PATH-0.png, ... for several images)")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files (refused otherwise)")

    e = sub.add_parser("edit", help="edit a photo by instruction (InstructPix2Pix); with --adapter also following a "
                                    "reference image")
    e.add_argument("--model", required=True, help="diffusers InstructPix2Pix folder (or hub id), 8-channel UNet, or "
                                                  "a single-file checkpoint")
    e.add_argument("--model-config", metavar="DIR",
                   help="with a single-file --model: a local diffusers folder to take the configs, tokenizer and "
                        "scheduler from (default: the SD1.5 / InstructPix2Pix ones shipped with the package)")
    e.add_argument("--image", required=True, help="the photo to edit")
    e.add_argument("--prompt", required=True, help="the edit, e.g. 'make it winter'")
    e.add_argument("--negative-prompt", default="")
    e.add_argument("--guidance-scale", type=float, default=7.5, help="text guidance s_T")
    e.add_argument("--image-guidance-scale", type=float, default=1.5, help="image guidance s_I (closeness to the photo)")
    e.add_argument("--steps", type=positive_int, default=100)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--scheduler", choices=["default", *SCHEDULERS], default="default")
    e.add_argument("--height", type=positive_int, default=None, help="default: the photo's, rounded to the VAE grid")
    e.add_argument("--width", type=positive_int, default=None)
    e.add_argument("--max-size", type=positive_int, default=None)
    e.add_argument("--num-images", type=positive_int, default=1)
    e.add_argument("--image-encoder", help="CLIPVisionModelWithProjection folder (with --adapter)")
    e.add_argument("--adapter", help="IP-Adapter+ or IPAdapter-Instruct file: also follow --adapter-image")
    e.add_argument("--adapter-image", help="the reference image the adapter reads (with --adapter)")
    e.add_argument("--instruct", default=None, help="what to take from the reference (IPAdapter-Instruct)")
    e.add_argument("--scale", type=float, default=0.8, help="adapter strength (0 = plain InstructPix2Pix)")
    add_lora_arg(e)
    add_runtime_args(e)
    e.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    e.add_argument("--out", required=True, help="PATH.png, .jpg, .jpeg or .webp (PATH-0.png, ... for several images)")
    e.add_argument("--overwrite", action="store_true", help="replace existing output files (refused otherwise)")

    t = sub.add_parser("make-tiny", help="write tiny random weights in the real on-disk formats")
    t.add_argument("dir")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--edit", action="store_true", help="the model is an InstructPix2Pix one (8-channel UNet)")
    t.add_argument("--single-file", action="store_true",
                   help="also DIR/model.safetensors: the same model as one original-layout checkpoint (with "
                        "--sdxl: SDXL's layout)")
    t.add_argument("--sdxl", action="store_true",
                   help="an SDXL model (two text encoders, added conditioning) and an IP-Adapter+ SDXL adapter")

    d = sub.add_parser("demo", help="what `make demo` runs (tiny random weights unless real ones are given)")
    d.add_argument("--model")
    d.add_argument("--image-encoder")
    d.add_argument("--adapter")
    d.add_argument("--image", help="condition image (default: one the demo draws)")
    d.add_argument("--instruct", default=None)
    d.add_argument("--steps", type=positive_int, default=20)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--cache", default=None, help="where the tiny weights are built (default: ~/.cache/...)")
    d.add_argument("--out", default=os.path.join("out", "demo.png"))
    add_runtime_args(d)
    add_serve_parser(sub)
    return parser


def add_serve_parser(sub) -> None:
    from .server.config import ServerConfig as C  # light: a dataclass; the defaults live there, once

    s = sub.add_parser("serve", help="an HTTP server with dynamic batching (FastAPI + uvicorn; --ray for Ray Serve)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--model", help="diffusers SD1.5 (or InstructPix2Pix) folder, or a single-file checkpoint")
    s.add_argument("--model-config", metavar="DIR",
                   help="with a single-file --model: a local diffusers folder to take the configs, tokenizer and "
                        "scheduler from (default: the SD1.5 / InstructPix2Pix ones shipped with the package)")
    s.add_argument("--image-encoder", help="CLIPVisionModelWithProjection folder (with --adapter)")
    s.add_argument("--adapter", help="two-key adapter file; without it the server is text to image")
    s.add_argument("--tiny", action="store_true", help="the tiny random weights (built once, as `make demo` does)")
    s.add_argument("--host", default=C.host, help="bind address (default: loopback only)")
    s.add_argument("--port", type=int, default=C.port, help="0 picks a free port")
    s.add_argument("--controlnet", action="append", default=[], metavar="DIR",
                   help="a diffusers ControlNetModel folder (one): requests then send control_image")
    add_lora_arg(s)
    add_runtime_args(s)
    s.add_argument("--batching", choices=["request", "step"], default=C.batching,
                   help="request: requests that arrive together share a call; step: a request joins the running "
                        "UNet batch at the next step and leaves after its last (continuous batching)")
    s.add_argument("--max-batch-rows", type=positive_int, default=C.max_batch_rows,
                   help="UNet rows per call: requests x guidance branches (2 simple, 4 full) x images")
    s.add_argument("--max-wait-ms", type=float, default=C.max_wait_ms,
                   help="how long the oldest waiting request waits for others to share its call")
    s.add_argument("--max-queue", type=positive_int, default=C.max_queue, help="waiting requests; more get 429")
    s.add_argument("--request-timeout-s", type=float, default=C.request_timeout_s,
                   help="a request still queued (or waiting to decode its images) this long after its body "
                        "arrived is dropped (504); one already running finishes")
    s.add_argument("--max-upload-mb", type=float, default=C.max_upload_mb, help="largest request body (413)")
    s.add_argument("--max-pixels", type=positive_int, default=C.max_pixels,
                   help="largest request image, width x height (413)")
    s.add_argument("--max-decode-pixels", type=positive_int, default=C.max_decode_pixels,
                   help="pixels being decoded at once over all requests; an image that does not fit waits for "
                        "room (one larger than this decodes alone), and 504 past --request-timeout-s")
    s.add_argument("--header-timeout-s", type=float, default=C.header_timeout_s,
                   help="a connection's request headers must arrive within this, else it is closed")
    s.add_argument("--body-timeout-s", type=float, default=C.body_timeout_s,
                   help="a request's body must arrive within this after its headers, else 408")
    s.add_argument("--api-key-file", help="file holding the key; /v1/* then needs `Authorization: Bearer KEY`")
    s.add_argument("--cache-size", type=int, default=C.cache_size,
                   help="entries in each conditioning cache (CLIP image and text encodings); 0 turns it off")
    s.add_argument("--cors-origin", help="allow this browser origin (CORS is off without it)")
    s.add_argument("--allowed-hosts", metavar="NAMES",
                   help="Host header names served, comma separated, * for any (default: the --host's own names: "
                        "127.0.0.1, localhost and [::1] on loopback, any on 0.0.0.0); checked without a key")
    s.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the warm-up request")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (the warm-up compiles the native size; other batch shapes compile "
                        "on first use)")
    s.add_argument("--cuda-graphs", action="store_true",
                   help="replay the UNet step from CUDA graphs (CUDA only; one capture per batch shape)")
    s.add_argument("--ray", action="store_true", help="run under Ray Serve (a local Ray instance unless RAY_ADDRESS)")
    s.add_argument("--replicas", type=positive_int, default=1, help="Ray Serve replicas (with --ray)")
    s.add_argument("--gpus-per-replica", type=float, default=None,
                   help="GPUs per Ray Serve replica (default: 1 with --device cuda or a GPU present, else 0)")


def check_generate_args(parser: Parser, a) -> None:
    """Flag combinations: an adapter run needs its image encoder and a condition image; a text-only run none."""
    if a.adapter:
        for flag, value in (("--image-encoder", a.image_encoder), ("--image", a.image)):
            if not value:
                parser.error(f"--adapter needs {flag} too (or drop --adapter for text-only generation)")
        n = len(a.adapter)
        for flag, values, allowed in (("--image", a.image, None), ("--scale", a.scale, (0, 1, n)),
                                      ("--adapter-mask", a.adapter_mask, (0, n)),
                                      ("--adapter-start", a.adapter_start, (0, 1, n)),
                                      ("--adapter-end", a.adapter_end, (0, 1, n))):
            if n > 1 and allowed is None:
                allowed = (1, n)
            if allowed is not None and len(values) not in allowed:
                parser.error(f"{flag} is given {len(values)} times for {n} --adapter: give it "
                             f"{' or '.join(str(k) for k in allowed if k)} times")
    else:
        given = [f for f, v in (("--image-encoder", a.image_encoder), ("--image", a.image),
                                ("--instruct", a.instruct), ("--scale", a.scale), ("--adapter-mask", a.adapter_mask),
                                ("--adapter-start", a.adapter_start), ("--adapter-end", a.adapter_end)) if v]
        if given:
            verb = "needs" if len(given) == 1 else "need"
            parser.error(f"{' and '.join(given)} {verb} --adapter (text-only generation takes none of them)")


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


def cmd_generate(a) -> int:
    # the cheap checks, before torch loads: output paths, size, condition image
    paths = output_paths(a.out, a.num_images, a.overwrite)
    native = native_size(a.model, a.model_config)
    if native is not None:  # a hub id is checked by the pipeline once loaded
        check_size(a.height, a.width, *native, a.max_size)
    adapter_args = adapter_call_args(a)
    quiet_libraries()
    from .pipeline import Pipeline

    if len(a.control_image) != len(a.controlnet) or len(a.controlnet_scale) not in (0, len(a.controlnet)):
        raise EngineError(f"give one --control-image (and at most one --controlnet-scale) per --controlnet: got "
                          f"{len(a.controlnet)} nets, {len(a.control_image)} images, {len(a.controlnet_scale)} scales")
    controls = [load_image(p, "control image") for p in a.control_image]
    adapter = None if not a.adapter else (a.adapter[0] if len(a.adapter) == 1 else a.adapter)
    pipe = Pipeline.from_pretrained(a.model, image_encoder=a.image_encoder, adapter=adapter, config=a.model_config,
                                    device=a.device, dtype=a.dtype, attention_backend=a.attention_backend,
                                    backend=a.backend, engines=a.engines, controlnet=a.controlnet or None, trt=a.trt,
                                    verify_fast_path=a.verify_fast_path)
    for path, scale in a.lora:
        pipe.load_lora_weights(path, scale=scale)
    pipe.set_progress_bar_config(disable=a.no_progress)
    sizes = {k: v for k, v in (("original_size", a.original_size), ("target_size", a.target_size),
                               ("crops_coords_top_left", a.crops_top_left)) if v is not None}
    if sizes and not getattr(pipe, "SDXL", False):
        raise EngineError("--original-size, --target-size and --crops-top-left are SDXL's size conditioning; "
                          f"{a.model} is not an SDXL model")
    images = pipe(prompt=a.prompt, **sizes, instruct=a.instruct, negative_prompt=a.negative_prompt, **adapter_args,
                  guidance_scale=a.guidance_scale, instruct_guidance_scale=a.instruct_guidance_scale,
                  image_guidance_scale=a.image_guidance_scale, guidance_mode=a.guidance_mode,
                  num_inference_steps=a.steps, height=a.height, width=a.width, num_images_per_prompt=a.num_images,
                  seed=a.seed, scheduler=a.scheduler, max_size=a.max_size,
                  **({} if not controls else dict(
                      control_image=controls[0] if len(controls) == 1 else controls,
                      controlnet_conditioning_scale=(a.controlnet_scale or [1.0] * len(controls))
                      if len(controls) > 1 else (a.controlnet_scale or [1.0])[0])))
    write_images(images, paths, overwrite=a.overwrite)
    print(" ".join(paths))
    return 0


def cmd_edit(a) -> int:
    # the cheap checks, before torch loads: output paths, the images, the adapter flags
    paths = output_paths(a.out, a.num_images, a.overwrite)
    given = [f for f, v in (("--image-encoder", a.image_encoder), ("--adapter-image", a.adapter_image)) if v is None]
    if a.adapter is not None and given:
        raise EngineError(f"--adapter needs {' and '.join(given)} too")
    if a.adapter is None and (a.image_encoder or a.adapter_image or a.instruct):
        raise EngineError("--image-encoder, --adapter-image and --instruct need --adapter")
    photo = load_image(a.image)
    reference = load_image(a.adapter_image) if a.adapter_image else None
    quiet_libraries()
    from .edit import EditPipeline

    pipe = EditPipeline.from_pretrained(a.model, image_encoder=a.image_encoder, adapter=a.adapter, device=a.device,
                                        dtype=a.dtype, attention_backend=a.attention_backend, backend=a.backend,
                                        engines=a.engines, config=a.model_config, trt=a.trt,
                                        verify_fast_path=a.verify_fast_path)
    for path, scale in a.lora:
        pipe.load_lora_weights(path, scale=scale)
    pipe.set_progress_bar_config(disable=a.no_progress)
    images = pipe(a.prompt, photo, a.negative_prompt, guidance_scale=a.guidance_scale,
                  image_guidance_scale=a.image_guidance_scale, num_inference_steps=a.steps, seed=a.seed,
                  scheduler=a.scheduler, num_images_per_prompt=a.num_images, height=a.height, width=a.width,
                  max_size=a.max_size, adapter_image=reference, instruct=a.instruct, scale=a.scale)
    write_images(images, paths, overwrite=a.overwrite)
    print(" ".join(paths))
    return 0


def cmd_demo(a) -> int:
    given = [a.model, a.image_encoder, a.adapter]
    if any(given) and not all(given):
        raise EngineError("give all of --model, --image-encoder and --adapter for real weights, "
                          "or none for the tiny ones")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    output_paths(a.out, 1, overwrite=True)  # the demo replaces its own files on every run
    image = load_image(a.image) if a.image else None
    quiet_libraries()
    from .demo import DEMO_INSTRUCT, cache_dir, draw_condition_image, ensure_tiny, run_demo
    from .pipeline import Pipeline

    random_weights = not all(given)
    if random_weights:  # the tiny set holds more (a CLIP for bench quality) than the pipeline takes
        tiny = ensure_tiny(a.cache or cache_dir())
        given = [tiny["model"], tiny["image_encoder"], tiny["adapter"]]
    model, image_encoder, adapter = given
    pipe = Pipeline.from_pretrained(model, image_encoder=image_encoder, adapter=adapter, device=a.device,
                                    dtype=a.dtype, attention_backend=a.attention_backend, backend=a.backend,
                                    engines=a.engines, trt=a.trt, verify_fast_path=a.verify_fast_path)
    pipe.set_progress_bar_config(disable=True)
    run_demo(pipe, a.out, draw_condition_image() if image is None else image, random_weights, a.steps, a.seed,
             instruct=a.instruct or DEMO_INSTRUCT)
    return 0


def cmd_make_tiny(a) -> int:
    quiet_libraries()
    from .tiny import make_tiny, make_tiny_sdxl, to_single_file

    if a.sdxl and a.edit:
        print("error: make-tiny --sdxl writes an SDXL text-to-image model (not with --edit)", file=sys.stderr)
        return 2
    if a.sdxl:  # a single file needs the encoders' widths unlike (the loader tells them apart by width, as in SDXL)
        paths = make_tiny_sdxl(a.dir, seed=a.seed, **({"text2_dim": 48} if a.single_file else {}))
    else:
        paths = make_tiny(a.dir, seed=a.seed, edit=a.edit)
    if a.single_file:
        paths["single_file"] = to_single_file(paths["model"],
                                              os.path.join(os.path.dirname(paths["model"]), "model.safetensors"))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def quiet_libraries() -> None:
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as tlog
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass


def check_serve_args(parser: Parser, a) -> None:
    if a.tiny:
        given = [f for f, v in (("--model", a.model), ("--image-encoder", a.image_encoder), ("--adapter", a.adapter))
                 if v is not None]
        if given:
            parser.error(f"--tiny takes no {', '.join(given)} (it serves the tiny random weights)")
    elif a.model is None and a.engines is None:
        parser.error("serve needs --model (and --image-encoder/--adapter for the adapter), --tiny, or "
                     "--backend tensorrt --engines DIR")
    if a.adapter is not None and a.image_encoder is None:
        parser.error("--adapter needs --image-encoder too")
    if a.image_encoder is not None and a.adapter is None:
        parser.error("--image-encoder needs --adapter")
    if not 0 <= a.port <= 65535:
        parser.error(f"--port must be 0-65535, got {a.port}")
    if a.max_wait_ms < 0 or a.request_timeout_s <= 0 or a.max_upload_mb <= 0 or a.cache_size < 0:
        parser.error("--max-wait-ms and --cache-size must not be negative; --request-timeout-s and "
                     "--max-upload-mb must be positive")
    for flag, value in (("--header-timeout-s", a.header_timeout_s), ("--body-timeout-s", a.body_timeout_s)):
        if not value > 0:
            parser.error(f"{flag} must be a positive number of seconds, got {value}")
    if a.cuda_graphs and a.device == "cpu":
        parser.error("--cuda-graphs needs a CUDA device (not --device cpu)")
    if len(a.controlnet) > 1:
        parser.error("serve takes one --controlnet (requests carry one control_image)")
    if (a.replicas != 1 or a.gpus_per_replica is not None) and not a.ray:
        parser.error("--replicas and --gpus-per-replica need --ray")


def cmd_serve(a) -> int:
    from .server.config import ServerConfig

    if a.tiny:
        from .demo import cache_dir, ensure_tiny
        tiny = ensure_tiny(cache_dir())
        a.model, a.image_encoder, a.adapter = tiny["model"], tiny["image_encoder"], tiny["adapter"]
    for what, path in (("model", a.model), ("image encoder", a.image_encoder), ("model config", a.model_config)):
        if path is not None and not os.path.isdir(path) and not (what == "model" and os.path.isfile(path)):
            raise EngineError(f"{what} folder not found: {path}")
    if a.adapter is not None and not os.path.isfile(a.adapter):
        raise EngineError(f"adapter file not found: {a.adapter}")
    config = ServerConfig.from_args(a)
    try:
        config.api_key()
    except (OSError, ValueError) as e:
        raise EngineError(f"--api-key-file: {e}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    if a.ray:
        from .server.ray_app import serve_ray
        return serve_ray(config, replicas=a.replicas, gpus_per_replica=a.gpus_per_replica)
    from .server.run import serve
    return serve(config)


COMMANDS = {"generate": cmd_generate, "edit": cmd_edit, "demo": cmd_demo, "make-tiny": cmd_make_tiny,
            "serve": cmd_serve}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "trt", "auto") != "auto" and args.backend != "tensorrt":
        parser.error(f"--trt {args.trt} chooses the TensorRT of --backend tensorrt: add --backend tensorrt "
                     "--engines DIR, or drop --trt")
    if args.command == "generate":
        check_generate_args(parser, args)
    if args.command == "serve":
        check_serve_args(parser, args)
        try:  # the server drains on SIGINT/SIGTERM itself
            return cmd_serve(args)
        except EngineError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    try:  # Ctrl-C: one line, exit 130 (engine/interrupt.py)
        return interruptible(lambda: COMMANDS[args.command](args))
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
