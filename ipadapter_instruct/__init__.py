"""IPAdapter-Instruct and InstructPix2Pix on Stable Diffusion: the engine, its kernels, export, trainer and bench.

    from ipadapter_instruct import Pipeline, EditPipeline

The repository's folders are this package's parts: engine/ is `ipadapter_instruct.engine`, and likewise
kernels/, export/, train/ and bench/. An installed wheel holds them inside this package; in a source checkout
(this file beside engine/, kernels/, ...) the package reaches its parts in the checkout, so code run from the
repository's root and the installed package are one and the same. Importing this package is light (no torch):
`Pipeline` and the other names load on first use.
"""
import os

__version__ = "0.1.0"
PARTS = ("engine", "kernels", "export", "train", "bench")

_here = os.path.dirname(os.path.abspath(__file__))
_checkout = os.path.dirname(_here)
if not os.path.isdir(os.path.join(_here, "engine")) and os.path.isfile(os.path.join(_checkout, "engine", "__init__.py")):
    __path__.append(_checkout)  # noqa: F821 (the package's own search path: its parts are the checkout's folders)

_LAZY = {"Pipeline": "ipadapter_instruct.engine.pipeline", "EditPipeline": "ipadapter_instruct.engine.edit",
         "SDXLPipeline": "ipadapter_instruct.engine.sdxl", "load_pipeline": "ipadapter_instruct.engine.registry",
         "EngineConfig": "ipadapter_instruct.engine.registry", "EngineError": "ipadapter_instruct.engine.errors"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ipadapter_instruct' has no attribute {name!r}")


def __dir__():
    return __all__
