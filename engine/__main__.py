"""python -m engine {generate, edit, make-tiny, demo, serve}: the command-line contract (docs/cli.md).

The parser (from the argument groups in engine/arguments.py) and the checks of flag combinations live here; what each
command does is engine/commands.py. Arguments, output paths, sizes and the condition image are checked before torch,
diffusers or triton is imported, so `--help` and every bad argument answer at once, and nothing heavy loads for a
run that would fail.
"""
from __future__ import annotations

import argparse
import os
import sys

from ipadapter_instruct.engine import DEFAULT_NEGATIVE, DEFAULT_PROMPT
from ipadapter_instruct.engine.arguments import (Parser, add_image_encoder_arg, add_lora_arg, add_model_args, add_output_args,
                        add_runtime_args, add_scheduler_arg, add_size_args, add_steps_and_seed_args, int_pair,
                        positive_int)
from ipadapter_instruct.engine.commands import COMMANDS, cmd_serve
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.guidance import MODES
from ipadapter_instruct.engine.interrupt import EXIT_INTERRUPTED, INTERRUPTED, interrupt_guard, interruptible  # noqa: F401 (tests use all)
from ipadapter_instruct.engine.registry import KINDS
from ipadapter_instruct.engine.server.config import ServerConfig
from ipadapter_instruct.engine.verbosity import add_verbose_arg


def build_parser() -> Parser:
    parser = Parser(prog="python -m engine", description="IPAdapter-Instruct generation on Stable Diffusion 1.5")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in (add_generate_parser, add_edit_parser, add_make_tiny_parser, add_demo_parser, add_serve_parser):
        add(sub)
    for command in sub.choices.values():
        add_verbose_arg(command)
    return parser


def add_generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="generate images from a prompt, and optionally a condition image and an "
                                        "instruction (with --adapter)")
    add_model_args(g, "diffusers SD1.5 folder (or hub id), or a single-file checkpoint (.safetensors/.ckpt, "
                      "original layout)", required=True)
    add_image_encoder_arg(g)
    g.add_argument("--adapter", action="append", default=[], metavar="FILE",
                   help="two-key adapter file (.bin or .safetensors); repeatable: several adapters act together; "
                        "without it: text to image")
    g.add_argument("--ip-adapter-image", "--image", dest="image", action="append", default=[], metavar="PATH",
                   help="the adapter's reference image (with --adapter; --image is its old name); repeatable: one per "
                        "--adapter, or with one adapter several images whose tokens are concatenated")
    g.add_argument("--prompt", default=None,
                   help=f"required without --adapter; with one the default is {DEFAULT_PROMPT!r}")
    g.add_argument("--negative-prompt", default=None,
                   help=f"default: none, or {DEFAULT_NEGATIVE!r} with --adapter")
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
    g.add_argument("--init-image", metavar="PATH",
                   help="start from this photo (img2img, as diffusers' StableDiffusionImg2ImgPipeline; the output is "
                        "its size unless --height/--width); with --mask: inpainting")
    g.add_argument("--strength", type=float, default=None, metavar="F",
                   help="with --init-image: how far from the photo to start, in (0, 1]; 1 starts from noise (default: "
                        "0.8 img2img / 1.0 inpaint (diffusers' defaults))")
    g.add_argument("--mask", "--mask-image", dest="mask", metavar="PATH",
                   help="with --init-image: inpainting; white is repainted, black kept (the photo's size)")
    g.add_argument("--guidance-scale", type=float, default=6.0)
    g.add_argument("--instruct-guidance-scale", type=float, default=6.0)
    g.add_argument("--image-guidance-scale", type=float, default=1.0)
    g.add_argument("--guidance-mode", choices=list(MODES), default="auto")
    add_steps_and_seed_args(g, steps=30)
    add_size_args(g, "default: the model's native size",
                  "largest height/width accepted (default: the model's native size x 4, 2048 for SD1.5)")
    add_scheduler_arg(g)
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
    add_output_args(g)


def add_edit_parser(sub) -> None:
    e = sub.add_parser("edit", help="edit a photo by instruction (InstructPix2Pix); with --adapter also following a "
                                    "reference image")
    add_model_args(e, "diffusers InstructPix2Pix folder (or hub id), 8-channel UNet, or a single-file checkpoint",
                   required=True)
    e.add_argument("--image", required=True, help="the photo to edit")
    e.add_argument("--prompt", required=True, help="the edit, e.g. 'make it winter'")
    e.add_argument("--negative-prompt", default="", help="default: none")
    e.add_argument("--guidance-scale", type=float, default=7.5, help="text guidance s_T")
    e.add_argument("--image-guidance-scale", type=float, default=1.5, help="image guidance s_I (closeness to the photo)")
    add_steps_and_seed_args(e, steps=100)
    add_scheduler_arg(e)
    add_size_args(e, "default: the photo's, rounded to the VAE grid")
    add_image_encoder_arg(e)
    e.add_argument("--adapter", help="IP-Adapter+ or IPAdapter-Instruct file: also follow --adapter-image")
    e.add_argument("--ip-adapter-image", "--adapter-image", dest="adapter_image",
                   help="the reference image the adapter reads (with --adapter; --adapter-image is its old name)")
    e.add_argument("--instruct", default=None, help="what to take from the reference (IPAdapter-Instruct)")
    e.add_argument("--scale", type=float, default=0.8, help="adapter strength (0 = plain InstructPix2Pix)")
    add_lora_arg(e)
    add_runtime_args(e)
    add_output_args(e)


def add_make_tiny_parser(sub) -> None:
    t = sub.add_parser("make-tiny", help="write tiny random weights in the real on-disk formats")
    t.add_argument("dir")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--edit", action="store_true", help="the model is an InstructPix2Pix one (8-channel UNet)")
    t.add_argument("--inpaint", action="store_true",
                   help="the model is an inpainting one (9-channel UNet: latents, mask, masked photo), for generate "
                        "--init-image --mask; its ControlNet reads the latents alone, as diffusers feeds it")
    t.add_argument("--single-file", action="store_true",
                   help="also DIR/model.safetensors: the same model as one original-layout checkpoint (with "
                        "--sdxl: SDXL's layout)")
    t.add_argument("--sdxl", action="store_true",
                   help="an SDXL model (two text encoders, added conditioning) and an IP-Adapter+ SDXL adapter")
    t.add_argument("--controlnet", action=argparse.BooleanOptionalAction, default=None,
                   help="also DIR/controlnet, a diffusers ControlNetModel folder that fits the model (default: on, "
                        "off with --edit: InstructPix2Pix takes no ControlNet)")
    t.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True,
                   help="also DIR/lora.safetensors, a LoRA of the UNet and text encoder(s) in diffusers' layout, "
                        "for --lora FILE:SCALE")


def add_demo_parser(sub) -> None:
    d = sub.add_parser("demo", help="what `make demo` runs (tiny random weights unless real ones are given)")
    d.add_argument("--model")
    d.add_argument("--image-encoder")
    d.add_argument("--adapter")
    d.add_argument("--image", help="condition image (default: one the demo draws)")
    d.add_argument("--instruct", default=None)
    add_steps_and_seed_args(d, steps=20)
    d.add_argument("--cache", default=None, help="where the tiny weights are built (default: ~/.cache/...)")
    d.add_argument("--out", default=os.path.join("out", "demo.png"))
    add_runtime_args(d)


def add_serve_parser(sub) -> None:
    C = ServerConfig  # the defaults live there, once
    s = sub.add_parser("serve", help="an HTTP server with dynamic batching (FastAPI + uvicorn; --ray for Ray Serve)")
    add_model_args(s, "diffusers SD1.5 (or InstructPix2Pix) folder, or a single-file checkpoint")
    add_image_encoder_arg(s)
    s.add_argument("--adapter", help="two-key adapter file; without it the server is text to image")
    s.add_argument("--tiny", action="store_true", help="the tiny random weights (built once, as `make demo` does)")
    s.add_argument("--kind", choices=list(KINDS), default=None,
                   help="the model kind to serve (default: what the model folder is; an InstructPix2Pix one edits)")
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
    s.add_argument("--max-size", type=positive_int, default=C.max_size,
                   help="largest output side in pixels, height or width (422 over it; default: 4x the model's "
                        "native size)")
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
    s.add_argument("--default-instruct", default=C.default_instruct, metavar="TEXT",
                   help="the instruction of an Automatic1111 IP-Adapter unit that sends no `instruct` (/sdapi/v1)")
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
        for flag, value in (("--image-encoder", a.image_encoder), ("--ip-adapter-image", a.image)):
            if not value:
                parser.error(f"--adapter needs {flag} too (or drop --adapter for text-only generation)")
        n = len(a.adapter)
        for flag, values, allowed in (("--ip-adapter-image", a.image, None), ("--scale", a.scale, (0, 1, n)),
                                      ("--adapter-mask", a.adapter_mask, (0, n)),
                                      ("--adapter-start", a.adapter_start, (0, 1, n)),
                                      ("--adapter-end", a.adapter_end, (0, 1, n))):
            if n > 1 and allowed is None:
                allowed = (1, n)
            if allowed is not None and len(values) not in allowed:
                parser.error(f"{flag} is given {len(values)} times for {n} --adapter: give it "
                             f"{' or '.join(str(k) for k in allowed if k)} times")
    else:
        given = [f for f, v in (("--image-encoder", a.image_encoder), ("--ip-adapter-image", a.image),
                                ("--instruct", a.instruct), ("--scale", a.scale), ("--adapter-mask", a.adapter_mask),
                                ("--adapter-start", a.adapter_start), ("--adapter-end", a.adapter_end)) if v]
        if given:
            verb = "needs" if len(given) == 1 else "need"
            parser.error(f"{' and '.join(given)} {verb} --adapter (text-only generation takes none of them)")
        if a.prompt is None:
            parser.error("text-only generation needs --prompt (with --adapter the adapter's default prompt is used)")
    check_start_args(parser, a)


def check_start_args(parser: Parser, a) -> None:
    """--mask and --strength start from a photo: they need --init-image; the strength is in (0, 1]."""
    if a.init_image is None:
        for flag, value, why in (("--mask", a.mask, "inpainting repaints a photo"),
                                 ("--strength", a.strength, "it says how far from the photo to start")):
            if value is not None:
                parser.error(f"{flag} needs --init-image ({why})")
    elif a.strength is not None and not 0 < a.strength <= 1:
        parser.error(f"--strength must be in (0, 1], got {a.strength:g}: 1 starts from noise, near 0 keeps the "
                     "photo (0 would run no step)")



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
