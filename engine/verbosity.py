"""How loud the libraries are: transformers' and diffusers' warnings and progress bars (huggingface_hub's too) are
quiet unless --verbose. One helper for every command line (engine, export, train, bench).

Light: the environment variables the libraries read at import do it before they load; a library already imported
is set through its own logging module."""
from __future__ import annotations

import logging
import os
import sys

VERBOSE_ENV = "IPAI_VERBOSE"  # set by --verbose, so that later code and child processes keep the libraries loud
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def add_verbose_arg(p) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="show the libraries' warnings and loading progress bars, and INFO logs")


def quiet_libraries(verbose: bool = False) -> None:
    """Quiet (the default) or, with verbose, the libraries' own warnings and bars and our INFO lines."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        os.environ[VERBOSE_ENV] = "1"
        for key in QUIET_ENV:
            os.environ.pop(key, None)
    else:
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
    logging.getLogger("diffusers").setLevel(logging.INFO if verbose else logging.ERROR)
    for name in ("transformers", "diffusers"):
        if f"{name}.utils.logging" in sys.modules:  # already imported: its env var was read
            lib = sys.modules[f"{name}.utils.logging"]
            lib.set_verbosity_warning() if verbose else lib.set_verbosity_error()
            lib.enable_progress_bar() if verbose else lib.disable_progress_bar()
    hub = sys.modules.get("huggingface_hub.utils")
    if hub is not None:
        hub.enable_progress_bars() if verbose else hub.disable_progress_bars()


def is_verbose() -> bool:
    """Whether --verbose asked for the libraries' own output (in this process or the one that started it)."""
    return os.environ.get(VERBOSE_ENV) == "1"
