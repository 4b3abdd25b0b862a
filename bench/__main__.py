"""python -m bench {ops, e2e}: measured side by side with what users would pick instead."""
from __future__ import annotations

import argparse
import os
import sys

import torch


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def build_parser() -> Parser:
    parser = Parser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    ops = sub.add_parser("ops", help="fused kernels vs two SDPA calls / xformers / reference, per SD1.5 shape")
    ops.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    ops.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                     help="default: float16 on cuda, float32 on cpu")
    ops.add_argument("--batch", type=positive_ints, default=[2, 4], help="batch sizes, e.g. 2,4 (default)")
    ops.add_argument("--repeats", type=int, default=None, help="timed calls per point (default: 50 cuda, 5 cpu)")
    ops.add_argument("--providers", default=None, help="comma-separated subset of fused,two-sdpa,xformers,reference")
    ops.add_argument("--json", default=os.path.join("out", "bench-ops.json"), help="where the result rows go")
    sub.add_parser("e2e", help="end-to-end request latency and throughput (not built yet)")
    return parser


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.command in (None, "e2e"):
        print("python -m bench: the end-to-end benchmark (e2e, the default) is not built yet; "
              "`python -m bench ops` measures the kernels", file=sys.stderr)
        return 2
    from .common import write_json
    from .ops import run_ops

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("python -m bench: error: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 2
    dtype = getattr(torch, a.dtype or ("float16" if device.type == "cuda" else "float32"))
    repeats = a.repeats or (50 if device.type == "cuda" else 5)
    wanted = a.providers.split(",") if a.providers else None
    rows, table = run_ops(device, dtype, a.batch, repeats, wanted)
    print(table)
    write_json(rows, a.json)
    print(f"\n{len(rows)} rows written to {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
