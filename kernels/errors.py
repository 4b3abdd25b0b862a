"""The one exception type the kernels raise for input they cannot take: its message is a single line naming the
problem. The engine re-exports it as `engine.errors.EngineError`, so a kernel's refusal reaches a user (CLI, server)
exactly like any other bad input, and nothing here imports the engine."""


class KernelError(ValueError):
    """Bad input to a kernel (shape, dtype, device) or a kernel that cannot run here. `str(err)` is one line."""
