"""`ipai`: one command for every part, the same subcommands as `python -m engine|export|train|bench`.

    ipai generate|edit|serve|make-tiny|demo ...   (python -m engine ...)
    ipai export onnx|trt|verify ...               (python -m export ...)
    ipai train [make-synthetic] ...               (python -m train ...)
    ipai bench [ops|e2e|serve|quality] ...        (python -m bench ...)
"""
from __future__ import annotations

import importlib
import sys

# the subcommands that are whole parts: the rest are the engine's own
PARTS = {"export": "ipadapter_instruct.export.__main__", "train": "ipadapter_instruct.train.__main__",
         "bench": "ipadapter_instruct.bench.__main__"}
ENGINE = "ipadapter_instruct.engine.__main__"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip().replace("`ipai`:", "usage: ipai COMMAND ... ;"), end="\n\n")
        print("`ipai COMMAND --help` for a command's flags.")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from ipadapter_instruct import __version__
        print(f"ipai {__version__}")
        return 0
    if argv[0] in PARTS:
        return importlib.import_module(PARTS[argv[0]]).main(argv[1:])
    return importlib.import_module(ENGINE).main(argv)


if __name__ == "__main__":
    sys.exit(main())
