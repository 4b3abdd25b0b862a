"""TensorRT for the engine: which TensorRT runs, which GPUs each serves, and the install fix TensorRT for RTX needs.

Two packages, one code path (their Python APIs are the same for the builder, the ONNX parser, IPluginV3 plugins
and the runtime):
- the full TensorRT (`import tensorrt`, 10.x/11.x; `pip install tensorrt-cu12`, whose libraries come from
  NVIDIA's package index): it builds plans on a GPU, for that GPU model, and serves datacenter GPUs (A100, H100,
  H200, L40S, ...) as well as RTX ones;
- TensorRT for RTX (`import tensorrt_rtx_bindings`, the `export` extra, from the package registry): it builds
  without a GPU ("CPU-only AOT") for the compute capabilities its builder can target (RTX_CCS), which have no
  Hopper (9.0) or datacenter Blackwell (10.0).
`load_tensorrt(trt)` takes the choice: "full", "rtx", or "auto" (full where it imports, else RTX); a plan built
by one cannot be deserialised by the other, so the runtime follows the builder named in engines.json.

TensorRT for RTX's libs wheel ships `libtensorrt_rtx.so.1` but not `libtensorrt_rtx.so`, which the ONNX parser
dlopens as soon as a graph has a plugin node; without it the process aborts inside a static initialiser
("terminate called without an active exception"). `load_tensorrt` adds that link beside the library before
anything is parsed, or stops with one line saying what to run when the folder is read-only.
"""
from __future__ import annotations

import functools
import importlib.util
import os

from ipadapter_instruct.engine.errors import EngineError

CHOICES = ("auto", "full", "rtx")
PACKAGES = {"full": "tensorrt", "rtx": "tensorrt_rtx_bindings"}
NAMES = {"full": "the full TensorRT", "rtx": "TensorRT for RTX"}
RTX_INSTALL = "pip install 'tensorrt-rtx-cu12-libs==1.7.1.116' 'tensorrt-rtx-cu12-bindings==1.7.1.116'"
FULL_INSTALL = "pip install tensorrt-cu12"  # its libraries download from NVIDIA's index (pypi.nvidia.com)
INSTALL = {"full": f"{FULL_INSTALL} (it fetches the libraries from NVIDIA's package index)",
           "rtx": f"{RTX_INSTALL} (or pip install '.[export]')"}
# Compute capabilities as major * 10 + minor (86 is 8.6). RTX_CCS: what TensorRT for RTX 1.7.1's builder can target,
# its ComputeCapability enum (SM75, SM80, SM86, SM89, SM120, SM121; a test holds the two equal). NVIDIA's support
# matrix lists 7.5, 8.6, 8.9, 12.0 and 12.1; the enum and its CPU-only AOT guide add 8.0 (A100).
RTX_CCS = (75, 80, 86, 89, 120, 121)
# What `python -m export trt` targets by default: all of them but Turing, for which TensorRT for RTX builds no
# float32 GEMM (its own refusal) and which NVIDIA advises plans of its own (`--arch 75` with a float16 export)
RTX_DEFAULT_CCS = (80, 86, 89, 120, 121)
FULL_MIN_CC = 75  # TensorRT 10 and 11 run on compute capability 7.5 and newer


def check_choice(trt: str) -> str:
    if trt not in CHOICES:
        raise EngineError(f"unknown TensorRT choice trt={trt!r}: choose one of {', '.join(CHOICES)} (auto: the full "
                          "TensorRT where it is installed, else TensorRT for RTX)")
    return trt


def load_tensorrt(trt: str = "auto"):
    """The TensorRT module trt asks for: "full" (`tensorrt`, 10 or newer), "rtx" (`tensorrt_rtx_bindings`) or
    "auto" (full where it imports, else RTX); EngineError with one line, the install command in it, when the one
    asked for does not import."""
    errors = {}
    for choice in ("full", "rtx") if check_choice(trt) == "auto" else (trt,):
        module, errors[choice] = import_tensorrt(choice)
        if module is not None:
            return module
    if trt != "auto":
        other = "rtx" if trt == "full" else "full"
        raise EngineError(f"{NAMES[trt]} is not installed ({errors[trt]}): {INSTALL[trt]}; or --trt {other} "
                          f"for {NAMES[other]}")
    raise EngineError(f"TensorRT is not installed (tensorrt: {errors['full']}; tensorrt_rtx_bindings: "
                      f"{errors['rtx']}): {INSTALL['rtx']} for RTX GPUs, or {INSTALL['full']} for datacenter GPUs "
                      "(A100, H100, H200) too")


@functools.cache
def import_tensorrt(choice: str):
    """(module, None) when the package of `choice` ("full" or "rtx") imports, else (None, why not in one line).
    Once per process: tests that put a module in sys.modules call import_tensorrt.cache_clear()."""
    try:
        if choice == "rtx":
            link_rtx_library()
            import tensorrt_rtx_bindings
            return tensorrt_rtx_bindings, None
        import tensorrt

        major = str(getattr(tensorrt, "__version__", "0")).split(".")[0]
        if not (major.isdigit() and int(major) >= 10 and hasattr(tensorrt, "IPluginV3")):
            return None, f"tensorrt {getattr(tensorrt, '__version__', '?')} is older than 10"
        return tensorrt, None
    except EngineError:
        raise
    except Exception as e:  # ImportError, or OSError from a bindings wheel without its libraries
        return None, _first_line(e)


def tensorrt_unavailable(trt: str = "auto") -> str | None:
    """None when the TensorRT `trt` asks for imports, else why not (one line)."""
    try:
        load_tensorrt(trt)
    except EngineError as e:
        return str(e)
    return None


def installed(choice: str) -> bool:
    """Whether the package of `choice` ("full" or "rtx") is installed, without importing it (no libraries load)."""
    try:
        return importlib.util.find_spec(PACKAGES[choice]) is not None
    except (ImportError, ValueError):
        return False


def choice_of(trt) -> str:
    """Which choice a TensorRT module is: "rtx" for TensorRT for RTX's, "full" for TensorRT's."""
    return "rtx" if trt.__name__.startswith("tensorrt_rtx") else "full"


def flavour(trt) -> str:
    return "TensorRT for RTX" if choice_of(trt) == "rtx" else "TensorRT"


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
