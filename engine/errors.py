"""The one exception type the engine raises for bad input: its message is a single line naming the problem."""


class EngineError(ValueError):
    """Bad input (a file, a checkpoint, an argument). `str(err)` is one line fit to show a user."""
