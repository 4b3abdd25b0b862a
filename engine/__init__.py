"""IPAdapter-Instruct generation on Stable Diffusion 1.5: load the checkpoints people have, generate fast.

This module stays light (no torch, diffusers or triton): it holds the constants the command line parses
against, and loads the pipeline on first use of `engine.Pipeline`.
"""
from ipadapter_instruct.engine.errors import EngineError

DEFAULT_PROMPT = "best quality, high quality"
DEFAULT_NEGATIVE = "monochrome, lowres, bad anatomy, worst quality, low quality"
DTYPE_NAMES = ("float32", "float16", "bfloat16")  # torch dtypes by name (engine.pipeline.DTYPES)
RUNTIMES = ("pytorch", "tensorrt")                # what runs the model
MAX_SIZE_FACTOR = 4  # the largest height/width a call accepts by default: the model's native size x 4

__all__ = ["Pipeline", "EditPipeline", "EngineError", "DEFAULT_PROMPT", "DEFAULT_NEGATIVE"]


def __getattr__(name):
    # the pipeline (torch, diffusers, transformers, kernels) loads on first use, so `python -m engine --help`
    # stays light
    if name == "Pipeline":
        from ipadapter_instruct.engine.pipeline import Pipeline
        return Pipeline
    if name == "EditPipeline":
        from ipadapter_instruct.engine.edit import EditPipeline
        return EditPipeline
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
