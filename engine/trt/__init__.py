"""TensorRT for the engine: which TensorRT is here, and the one install fix TensorRT for RTX needs.

One code path for both packages: `tensorrt` (TensorRT 10.x/11.x, where a user has it) and, where it is not
installed, TensorRT for RTX (`tensorrt_rtx_bindings`, the `export` extra, installable from the package registry).
Their Python APIs are the same for what the project uses (builder, ONNX parser, IPluginV3 plugins, runtime).

TensorRT for RTX builds engines without a GPU ("CPU-only AOT"); running one needs a GPU it supports. Its libs
wheel ships `libtensorrt_rtx.so.1` but not `libtensorrt_rtx.so`, which the ONNX parser dlopens as soon as a graph
has a plugin node; without it the process aborts inside a static initialiser ("terminate called without an active
exception"). `load_tensorrt` adds that link beside the library before anything is parsed, or stops with one line
saying what to run when the folder is read-only.
"""
from __future__ import annotations

import functools
import os

from ..errors import EngineError

INSTALL = "pip install 'tensorrt-rtx-cu12-libs==1.7.1.116' 'tensorrt-rtx-cu12-bindings==1.7.1.116'"
# TensorRT for RTX's support matrix (1.x): Turing (with a build flag), Ampere, Ada, Blackwell; not Hopper (sm_90)
RTX_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_100", "sm_120")


@functools.cache
def load_tensorrt():
    """The TensorRT module (`tensorrt` if installed and >= 10, else `tensorrt_rtx_bindings`); EngineError with one
    line when neither imports."""
    errors = []
    try:
        import tensorrt

        major = str(getattr(tensorrt, "__version__", "0")).split(".")[0]
        if major.isdigit() and int(major) >= 10 and hasattr(tensorrt, "IPluginV3"):
            return tensorrt
        errors.append(f"tensorrt {getattr(tensorrt, '__version__', '?')} is older than 10")
    except Exception as e:  # ImportError, or OSError from a bindings wheel without its libraries
        errors.append(f"tensorrt: {_first_line(e)}")
    try:
        link_rtx_library()
        import tensorrt_rtx_bindings
        return tensorrt_rtx_bindings
    except EngineError:
        raise
    except Exception as e:
        errors.append(f"tensorrt_rtx_bindings: {_first_line(e)}")
    raise EngineError(f"TensorRT is not installed ({'; '.join(errors)}): {INSTALL} (or pip install '.[export]')")


def tensorrt_unavailable() -> str | None:
    """None when a TensorRT imports, else why not (one line)."""
    try:
        load_tensorrt()
    except EngineError as e:
        return str(e)
    return None


def flavour(trt) -> str:
    return "TensorRT for RTX" if trt.__name__.startswith("tensorrt_rtx") else "TensorRT"


def link_rtx_library() -> None:
    """Make sure tensorrt_rtx_libs/libtensorrt_rtx.so exists (a link to libtensorrt_rtx.so.1); no-op without the
    package. Safe to call from several processes at once."""
    try:
        import tensorrt_rtx_libs
    except ImportError:
        return
    folder = os.path.dirname(os.path.abspath(tensorrt_rtx_libs.__file__))
    link = os.path.join(folder, "libtensorrt_rtx.so")
    if os.path.exists(link) or not os.path.exists(os.path.join(folder, "libtensorrt_rtx.so.1")):
        return
    try:
        if os.path.islink(link):  # a dangling link: replace it
            os.remove(link)
        os.symlink("libtensorrt_rtx.so.1", link)
    except FileExistsError:
        pass  # another process made it first
    except OSError as e:
        raise EngineError(f"TensorRT for RTX's ONNX parser needs {link}, which its wheel does not ship, and it cannot "
                          f"be created here ({e.strerror}): run `ln -s libtensorrt_rtx.so.1 {link}`") from None


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
