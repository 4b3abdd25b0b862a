"""Reading torch pickles without running code.

A `.bin`/`.ckpt`/`.pt` file is a pickle, and a pickle can name any Python callable (`os.system` included) for the
unpickler to call. Every torch.load in the project passes weights_only=True: torch's restricted unpickler then
builds tensors, containers and plain values only, and refuses any other name. diffusers (0.42) and transformers
(5.x) load `.bin` weights the same way. This module turns that refusal, raised here or inside those libraries, into
one line naming the file and the object it asked for. Light: torch is imported by the call only.
"""
from __future__ import annotations

import os
import re

from ipadapter_instruct.engine.errors import EngineError

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
PICKLES = (".bin", ".ckpt", ".pt", ".pth")


def refusal(e: BaseException | None) -> str | None:
    """Torch's weights-only refusal in `e` or in what caused it, as one line; None when it is another error."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        if "Weights only load failed" in text:
            name = _GLOBAL.search(text)
            what = f"a Python object ({name.group(1)})" if name else "Python objects besides tensors"
            return (f"it holds {what} that only a code-running unpickler builds: refused (weights files may hold "
                    "tensors and plain values only; re-save the weights from a trusted copy, as .safetensors)")
        e = e.__cause__ or e.__context__
    return None


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def load_pickle(path, what: str, map_location="cpu"):
    """torch.load(path, weights_only=True) -> the object; EngineError "cannot read {what} {path}: ..." otherwise."""
    import torch  # (deferred: callers answer bad arguments before torch loads)

    path = os.fspath(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt, foreign or refused pickle
        raise EngineError(f"cannot read {what} {path}: {refusal(e) or first_line(e)}") from None


def load_error(what: str, e: BaseException, folder=None) -> EngineError:
    """The EngineError for a library's failed load of `what`: when torch refused a pickle, that refusal and the file
    (named in the library's message, or the pickles in `folder`), else the error's first line."""
    reason = refusal(e)
    if reason is None:
        return EngineError(f"cannot load {what}: {first_line(e)}")
    files = re.findall(r"'([^']+\.(?:bin|ckpt|pt|pth))'", str(e))[:1]  # diffusers names the file it could not read
    if not files and folder is not None and os.path.isdir(folder):
        files = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(PICKLES)]
    return EngineError(f"cannot load {what}: {', '.join(files) + ' ' if files else ''}{reason}")
