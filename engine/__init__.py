"""IPAdapter-Instruct generation on Stable Diffusion 1.5: load the checkpoints people have, generate fast."""
from .errors import EngineError
from .pipeline import DEFAULT_NEGATIVE, DEFAULT_PROMPT, Pipeline

__all__ = ["Pipeline", "EngineError", "DEFAULT_PROMPT", "DEFAULT_NEGATIVE"]
