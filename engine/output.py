"""Writing results: all-or-nothing, so a failed request leaves no half-written file behind."""
from __future__ import annotations

import os

from .errors import EngineError


def write_images(images, paths) -> None:
    """Write every image to a temporary name, then rename: no half-written or partial output is left."""
    tmps = []
    try:
        for img, path in zip(images, paths):
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                raise EngineError(f"output folder does not exist: {folder}")
            tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
            tmps.append(tmp)
            img.save(tmp, format="PNG")
        for tmp, path in zip(tmps, paths):
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)


def output_paths(out: str, n: int) -> list[str]:
    if not out.lower().endswith(".png"):
        raise EngineError(f"--out must name a .png file, got {out}")
    if n == 1:
        return [out]
    stem = out[: -len(".png")]
    return [f"{stem}-{i}.png" for i in range(n)]
