"""A source checkout's folders under their bare names.

The repository keeps the package's parts as top-level folders (engine/, kernels/, ...), so code run from the
repository's root can also reach them by their bare names. `kernels` is also Hugging Face's package, which
transformers imports by that name: imported so from a checkout, our kernels/ hands the name over to theirs.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _is_checkout(entry: str) -> bool:
    try:
        return os.path.samefile(entry or os.getcwd(), CHECKOUT)
    except OSError:
        return False


def hand_over(name: str) -> None:
    """Put the other package installed under `name` in sys.modules[name] in place of the checkout's folder (the
    import statement that is loading the folder then returns it), or raise ModuleNotFoundError as a plain
    environment would."""
    path = [entry for entry in sys.path if not _is_checkout(entry)]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r} (this checkout's {name}/ folder is "
                                  f"ipadapter_instruct.{name})", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
