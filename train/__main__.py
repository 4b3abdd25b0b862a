"""python -m train: train IPAdapter-Instruct weights the engine loads (docs/training.md).

    python -m train --model DIR --image-encoder DIR --data MANIFEST.jsonl --out DIR [--init-adapter FILE]
        [--steps N] [--batch-size N] [--grad-accum N] [--lr F] [--resolution N]
        [--mixed-precision no|fp16|bf16] [--save-every N] [--resume]
    python -m train make-synthetic DIR --n N

Several processes (data parallel, DDP through accelerate; --batch-size is per process):
    accelerate launch --multi_gpu --num_processes N -m train ...     (on the CPU too: gloo)
    torchrun --nproc_per_node N -m train ...

`--help` shows every default; --resolution defaults to the model's native size (UNet sample_size x VAE factor).
"""
from __future__ import annotations

import argparse
import logging
import sys

from ipadapter_instruct.engine import arguments
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.interrupt import interruptible
from ipadapter_instruct.engine.verbosity import add_verbose_arg, quiet_libraries


class Parser(arguments.Parser):
    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in --help, except flags (off) and options whose help says what their absence means."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def train_parser() -> Parser:
    p = Parser(prog="python -m train", description="Train an IPAdapter-Instruct adapter on a frozen SD1.5.")
    p.add_argument("--model", required=True, help="diffusers SD1.5 folder")
    p.add_argument("--image-encoder", required=True, help="CLIPVisionModelWithProjection folder")
    p.add_argument("--data", required=True, help="manifest, JSONL (python -m train make-synthetic writes one)")
    p.add_argument("--out", required=True, help="checkpoints/, log.csv, tensorboard/ and adapter.safetensors go here")
    p.add_argument("--init-adapter", default=None,
                   help="IP-Adapter+ (image path copied) or IPAdapter-Instruct file (default: train from scratch)")
    p.add_argument("--steps", type=positive(int), default=1000, help="optimizer steps in all")
    p.add_argument("--batch-size", type=positive(int), default=4, help="per process")
    p.add_argument("--grad-accum", type=positive(int), default=1,
                   help="micro-batches per optimizer step")
    p.add_argument("--lr", type=positive(float), default=1e-5, help="AdamW learning rate after warm-up")
    p.add_argument("--resolution", type=positive(int), default=None,
                   help="training image size in pixels (default: the model's native size, UNet sample_size x VAE "
                        "factor: 512 for SD1.5, 64 for the tiny model)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no",
                   help="accelerate's autocast for the forward and backward (fp16: with loss scaling, GPU only)")
    p.add_argument("--save-every", type=positive(int), default=500, help="checkpoint + validation every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--warmup-steps", type=int, default=100, help="linear learning-rate warm-up")
    p.add_argument("--ema-decay", type=float, default=None,
                   help="keep an EMA of the weights and save it, e.g. 0.999 (default: no EMA)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute UNet activations in the backward: less memory")
    p.add_argument("--val-fraction", type=float, default=0.05, help="held-out share of the manifest")
    p.add_argument("--on-bad-data", choices=["fatal", "skip"], default="fatal",
                   help="a bad manifest line or image stops the run (fatal) or is reported and left out (skip)")
    p.add_argument("--seed", type=int, default=0, help="adapter init, data order and every example's noise")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_verbose_arg(p)
    return p


INTERRUPTED = ("python -m train: interrupted (Ctrl-C): stopped; the checkpoints saved so far are kept (--resume goes "
               "on from the last)")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return interruptible(lambda: command(argv), INTERRUPTED)  # Ctrl-C: one line, exit 130


def command(argv) -> int:
    try:
        if argv and argv[0] == "make-synthetic":
            p = Parser(prog="python -m train make-synthetic", description="Write a small synthetic training set.")
            p.add_argument("dir", help="where manifest.jsonl and its images go")
            p.add_argument("--n", type=positive(int), default=40, help="examples")
            p.add_argument("--seed", type=int, default=0, help="what the images show")
            a = p.parse_args(argv[1:])
            from ipadapter_instruct.train.data import make_synthetic
            print(make_synthetic(a.dir, a.n, seed=a.seed))
            return 0
        a = train_parser().parse_args(argv)
        quiet_libraries(a.verbose)
        from ipadapter_instruct.train.loop import TrainConfig, train
        cfg = TrainConfig(model=a.model, image_encoder=a.image_encoder, data=a.data, out=a.out,
                          init_adapter=a.init_adapter, steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum,
                          lr=a.lr, resolution=a.resolution, mixed_precision=a.mixed_precision,
                          save_every=a.save_every, resume=a.resume, warmup_steps=a.warmup_steps,
                          ema_decay=a.ema_decay, gradient_checkpointing=a.gradient_checkpointing,
                          val_fraction=a.val_fraction, on_bad_data=a.on_bad_data, seed=a.seed, device=a.device,
                          progress=not a.no_progress)
        print(train(cfg))
        return 0
    except EngineError as e:
        print(f"python -m train: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
