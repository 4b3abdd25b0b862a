"""python -m train: train IPAdapter-Instruct weights the engine loads (README, "Trainer").

    python -m train --model DIR --image-encoder DIR --data MANIFEST.jsonl --out DIR [--init-adapter FILE]
        [--steps N] [--batch-size N] [--grad-accum N] [--lr F] [--resolution N]
        [--mixed-precision no|fp16|bf16] [--save-every N] [--resume]
    python -m train make-synthetic DIR --n N
"""
from __future__ import annotations

import argparse
import logging
import sys

from engine.errors import EngineError


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


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
    p.add_argument("--init-adapter", default=None, help="IP-Adapter+ (image path copied) or IPAdapter-Instruct file")
    p.add_argument("--steps", type=positive(int), default=1000)
    p.add_argument("--batch-size", type=positive(int), default=4, help="per process")
    p.add_argument("--grad-accum", type=positive(int), default=1)
    p.add_argument("--lr", type=positive(float), default=1e-5)
    p.add_argument("--resolution", type=positive(int), default=512)
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--save-every", type=positive(int), default=500, help="checkpoint + validation every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--ema-decay", type=float, default=None, help="keep an EMA of the weights and save it (e.g. 0.999)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--val-fraction", type=float, default=0.05, help="held-out share of the manifest")
    p.add_argument("--on-bad-data", choices=["fatal", "skip"], default="fatal",
                   help="a bad manifest line or image stops the run (fatal) or is reported and left out (skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if argv and argv[0] == "make-synthetic":
            p = Parser(prog="python -m train make-synthetic", description="Write a small synthetic training set.")
            p.add_argument("dir")
            p.add_argument("--n", type=positive(int), default=40)
            p.add_argument("--seed", type=int, default=0)
            a = p.parse_args(argv[1:])
            from .data import make_synthetic
            print(make_synthetic(a.dir, a.n, seed=a.seed))
            return 0
        a = train_parser().parse_args(argv)
        from .loop import TrainConfig, train
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
