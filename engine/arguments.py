"""The command line's argument types and the argument groups several commands share, each written once.

Light: argparse and the engine's name tables only, so `python -m engine --help` imports no torch.
"""
from __future__ import annotations

import argparse
import copy

from ipadapter_instruct.kernels import BACKENDS

from ipadapter_instruct.engine import DTYPE_NAMES, RUNTIMES
from ipadapter_instruct.engine.loading import SCHEDULERS
from ipadapter_instruct.engine.trt import CHOICES as TRT_CHOICES

MODEL_CONFIG_HELP = ("with a single-file --model: a local diffusers folder to take the configs, tokenizer and "
                     "scheduler from (default: the SD1.5 / InstructPix2Pix ones shipped with the package)")


class HelpFormatter(argparse.HelpFormatter):
    """--help shows each option's default, "(default: X)", unless it has none to show (None, off, empty) or its help
    already says what it is."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is None or default is False or default in ([], "")
                or default is argparse.SUPPRESS or "default" in text.lower()):
            return text
        return f"{text} (default: %(default)s)".strip()

    def _format_action(self, action):
        if not action.help and self._get_help_string(action):  # (argparse shows no help line for these)
            action = copy.copy(action)
            action.help = self._get_help_string(action)
        return super()._format_action(action)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (exit 2), like every other error here, and no flag is
    taken by a prefix of its name (`--step 2` is refused, not read as `--steps 2`); --help shows the defaults. Every
    command line uses it."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

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


def add_model_args(p: argparse.ArgumentParser, model_help: str, required: bool = False) -> None:
    """--model (what it may be differs by command) and --model-config for a single-file one."""
    p.add_argument("--model", required=required, help=model_help)
    p.add_argument("--model-config", metavar="DIR", help=MODEL_CONFIG_HELP)


def add_image_encoder_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-encoder", help="CLIPVisionModelWithProjection folder (with --adapter)")


def add_steps_and_seed_args(p: argparse.ArgumentParser, steps: int) -> None:
    p.add_argument("--num-inference-steps", "--steps", dest="steps", type=positive_int, default=steps, metavar="N",
                   help="denoising steps")
    p.add_argument("--seed", type=int, default=None,
                   help="the noise seed; image j of several is seed + j (default: a fresh one; the seeds used are "
                        "printed and written into PNGs)")


def add_scheduler_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", choices=["default", *SCHEDULERS], default="default",
                   help="the sampler (default: the model's own scheduler)")


def add_size_args(p: argparse.ArgumentParser, height_help: str, max_size_help: str | None = None) -> None:
    """The output size (None: the command's default, which height_help names), its limit and the image count."""
    p.add_argument("--height", type=positive_int, default=None, help=height_help)
    p.add_argument("--width", type=positive_int, default=None)
    p.add_argument("--max-size", type=positive_int, default=None, help=max_size_help)
    p.add_argument("--num-images-per-prompt", "--num-images", dest="num_images", type=positive_int, default=1,
                   metavar="N", help="images to make")


def add_lora_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", type=lora_arg, action="append", default=[], metavar="FILE[:SCALE]",
                   help="a LoRA (diffusers, kohya or A1111 .safetensors) at SCALE (default 1), fused into the "
                        "weights; repeatable")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """Where and how the model runs: device, dtype, attention kernel, backend (EngineConfig's fields of those names)."""
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
    p.add_argument("--channels-last", action="store_true",
                   help="the UNet and VAE in channels-last memory format (measure it: it pays on some devices)")
    p.add_argument("--no-verify-fast-path", dest="verify_fast_path", action="store_false",
                   help="skip the first-use check of each fused kernel, CUDA-graph replay and compiled UNet against "
                        "its eager path (on by default: one extra eager call per new shape, with a fallback where "
                        "the fast path fails)")


def add_output_args(p: argparse.ArgumentParser) -> None:
    """Where the images go, for the commands that write them (generate, edit)."""
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--out", required=True, help="PATH.png, .jpg, .jpeg or .webp (PATH-0.png, ... for several images)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (refused otherwise)")
