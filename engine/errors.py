"""The one exception type the engine raises for bad input: its message is a single line naming the problem.

It is the kernels' own type (kernels.errors.KernelError) under the engine's name: the layers point one way
(kernels <- engine <- export, train, bench), and `except EngineError` still catches a kernel's refusal."""
from ipadapter_instruct.kernels.errors import KernelError as EngineError

__all__ = ["EngineError"]
