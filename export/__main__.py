"""python -m export {plugin, onnx, verify, trt}: the adapter UNet for TensorRT (README, "Export")."""
from __future__ import annotations

import argparse
import os
import sys


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv=None) -> int:
    from .plugin import ARCHS, DTYPES, HEAD_DIMS, HEADS

    p = Parser(prog="python -m export", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    pl = sub.add_parser("plugin", help="compile the plugin's attention kernels (cubin + PTX) and their JSON index")
    pl.add_argument("--out", required=True)
    pl.add_argument("--arch", type=int, choices=ARCHS, action="append", help="repeatable; default: all")
    pl.add_argument("--dtype", choices=DTYPES, action="append", help="repeatable; default: all")
    pl.add_argument("--head-dim", type=int, choices=HEAD_DIMS, action="append", help="repeatable; default: all")
    pl.add_argument("--heads", type=int, default=HEADS, help=f"attention heads (default {HEADS}, SD1.5)")
    for name in ("onnx", "verify", "trt"):
        sub.add_parser(name, help="not built yet")
    a = p.parse_args(argv)
    if a.command != "plugin":
        print(f"python -m export {a.command}: not built yet (issue 6); `python -m export plugin` is", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("python -m export plugin: error: unset TRITON_INTERPRET (the interpreter cannot compile)",
              file=sys.stderr)
        return 2
    from .plugin import write_plugin
    print(write_plugin(a.out, tuple(a.arch or ARCHS), tuple(a.dtype or DTYPES), tuple(a.head_dim or HEAD_DIMS), a.heads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
