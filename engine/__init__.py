"""IPAdapter-Instruct generation on Stable Diffusion 1.5: load the checkpoints people have, generate fast."""
from .errors import EngineError

__all__ = ["Pipeline", "EngineError", "DEFAULT_PROMPT", "DEFAULT_NEGATIVE"]


def __getattr__(name):
    # the pipeline (diffusers, transformers, kernels) loads on first use, so `engine.errors` stays light
    # enough for `kernels` to import without a cycle
    if name in ("Pipeline", "DEFAULT_PROMPT", "DEFAULT_NEGATIVE"):
        from . import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
