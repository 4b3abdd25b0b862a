"""python -m engine {generate, make-tiny, demo}: the command-line contract (README, "CLI")."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from kernels import BACKENDS

from .errors import EngineError
from .loading import SCHEDULERS
from .output import output_paths, write_images
from .pipeline import DEFAULT_NEGATIVE, DEFAULT_PROMPT, DTYPES, RUNTIMES


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (exit 2), like every other error here."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: float16 on cuda, float32 on cpu")
    p.add_argument("--attention-backend", choices=list(BACKENDS), default="auto",
                   help="cross-attention: the fused Triton kernel, two SDPA calls, or the plain reference "
                        "(auto: triton on CUDA, sdpa elsewhere)")
    p.add_argument("--backend", choices=list(RUNTIMES), default="pytorch",
                   help="what runs the model: pytorch, or tensorrt (not available yet: says why and exits)")


def build_parser() -> Parser:
    parser = Parser(prog="python -m engine", description="IPAdapter-Instruct generation on Stable Diffusion 1.5")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    g = sub.add_parser("generate", help="generate images from a prompt, a condition image and an instruction")
    g.add_argument("--model", required=True, help="diffusers SD1.5 folder (or hub id)")
    g.add_argument("--image-encoder", required=True, help="CLIPVisionModelWithProjection folder")
    g.add_argument("--adapter", required=True, help="two-key adapter file (.bin or .safetensors)")
    g.add_argument("--image", required=True, help="condition image")
    g.add_argument("--prompt", default=DEFAULT_PROMPT)
    g.add_argument("--negative-prompt", default=DEFAULT_NEGATIVE)
    g.add_argument("--instruct", default=None, help="what to take from the image (required by IPAdapter-Instruct)")
    g.add_argument("--scale", type=float, default=0.8, help="adapter strength (0 = base model)")
    g.add_argument("--guidance-scale", type=float, default=6.0)
    g.add_argument("--instruct-guidance-scale", type=float, default=6.0)
    g.add_argument("--image-guidance-scale", type=float, default=1.0)
    g.add_argument("--guidance-mode", choices=["auto", "simple", "full"], default="auto")
    g.add_argument("--steps", type=positive_int, default=30)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--height", type=positive_int, default=None, help="default: the model's native size")
    g.add_argument("--width", type=positive_int, default=None)
    g.add_argument("--num-images", type=positive_int, default=1)
    g.add_argument("--scheduler", choices=["default", *SCHEDULERS], default="default")
    add_runtime_args(g)
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g.add_argument("--out", required=True, help="PATH.png (PATH-0.png, PATH-1.png, ... for several images)")

    t = sub.add_parser("make-tiny", help="write tiny random weights in the real on-disk formats")
    t.add_argument("dir")
    t.add_argument("--seed", type=int, default=0)

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
    return parser


def cmd_generate(a) -> int:
    from .pipeline import Pipeline, load_image

    paths = output_paths(a.out, a.num_images)
    image = load_image(a.image)  # fail on a bad image before loading gigabytes of weights
    pipe = Pipeline.from_pretrained(a.model, image_encoder=a.image_encoder, adapter=a.adapter,
                                    device=a.device, dtype=a.dtype, attention_backend=a.attention_backend,
                                    backend=a.backend)
    pipe.set_progress_bar_config(disable=a.no_progress)
    images = pipe(prompt=a.prompt, image=image, instruct=a.instruct, negative_prompt=a.negative_prompt,
                  scale=a.scale, guidance_scale=a.guidance_scale, instruct_guidance_scale=a.instruct_guidance_scale,
                  image_guidance_scale=a.image_guidance_scale, guidance_mode=a.guidance_mode,
                  num_inference_steps=a.steps, height=a.height, width=a.width, num_images_per_prompt=a.num_images,
                  seed=a.seed, scheduler=a.scheduler)
    write_images(images, paths)
    print(" ".join(paths))
    return 0


def cmd_demo(a) -> int:
    from .demo import DEMO_INSTRUCT, cache_dir, draw_condition_image, ensure_tiny, run_demo
    from .pipeline import Pipeline, load_image

    given = [a.model, a.image_encoder, a.adapter]
    if any(given) and not all(given):
        raise EngineError("give all of --model, --image-encoder and --adapter for real weights, or none for the tiny ones")
    random_weights = not all(given)
    paths = ensure_tiny(a.cache or cache_dir()) if random_weights else dict(
        model=a.model, image_encoder=a.image_encoder, adapter=a.adapter)
    image = load_image(a.image) if a.image else draw_condition_image()
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    pipe = Pipeline.from_pretrained(**paths, device=a.device, dtype=a.dtype, attention_backend=a.attention_backend,
                                    backend=a.backend)
    pipe.set_progress_bar_config(disable=True)
    run_demo(pipe, a.out, image, random_weights, a.steps, a.seed, instruct=a.instruct or DEMO_INSTRUCT)
    return 0


def cmd_make_tiny(a) -> int:
    from .tiny import make_tiny

    for name, path in make_tiny(a.dir, seed=a.seed).items():
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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        return {"generate": cmd_generate, "demo": cmd_demo, "make-tiny": cmd_make_tiny}[args.command](args)
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
