"""Writing results: every output path is checked before any work starts, and writing is all-or-nothing, so a
failed or interrupted request leaves no file (nor temporary) behind. Light: no torch."""
from __future__ import annotations

import os
import tempfile

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.pnginfo import pnginfo

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # --out extension -> PIL format
_pending: set[str] = set()  # temporary files being written, for discard_pending() on a forced exit


def output_paths(out: str, n: int, overwrite: bool = False) -> list[str]:
    """The n files `out` names (PATH.ext, or PATH-0.ext ... for several), checked: a known extension, an existing
    writable folder, and no existing file unless overwrite."""
    stem, ext = os.path.splitext(out)
    if ext.lower() not in FORMATS:
        *most, last = FORMATS
        raise EngineError(f"--out must name a {', '.join(most)} or {last} file, got {out}")
    paths = [out] if n == 1 else [f"{stem}-{i}{ext}" for i in range(n)]
    check_writable(paths, overwrite)
    return paths


def check_writable(paths, overwrite: bool = False) -> None:
    folders = []
    for path in paths:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise EngineError(f"output folder does not exist: {folder}")
        if os.path.isdir(path):
            raise EngineError(f"output path is a folder, not a file: {path}")
        if os.path.lexists(path) and not overwrite:
            raise EngineError(f"output file exists: {path}; pass --overwrite to replace it")
        if folder not in folders:
            folders.append(folder)
    for folder in folders:  # os.access says yes to root on read-only mounts: try for real
        try:
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check-")
            os.close(fd)
            os.remove(probe)
        except OSError as e:
            raise EngineError(f"output folder is not writable: {folder} ({e.strerror or e})") from None


def _place(tmp: str, path: str, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:  # a hard link fails if the name exists, so two runs racing for one --out cannot both win
        os.link(tmp, path)
    except FileExistsError:
        raise EngineError(f"output file exists: {path}; pass --overwrite to replace it") from None
    except OSError:  # no hard links on this file system
        if os.path.lexists(path):
            raise EngineError(f"output file exists: {path}; pass --overwrite to replace it") from None
        os.replace(tmp, path)
    else:
        os.remove(tmp)


def write_images(images, paths, overwrite: bool = False, params=None) -> None:
    """Write every image (in its extension's format) to a temporary name, then rename them all; on any failure,
    Ctrl-C included, the temporaries and the files already renamed are removed. params: per image, its generation
    parameters, which a PNG carries in its "parameters" text chunk (engine/pnginfo.py)."""
    tmps, placed, path, complete = [], [], None, False
    params = params or [None] * len(paths)
    try:
        for img, path, info in zip(images, paths, params):
            folder, name = os.path.split(os.path.abspath(path))
            tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
            tmps.append(tmp)
            _pending.add(tmp)
            fmt = FORMATS[os.path.splitext(path)[1].lower()]
            img.save(tmp, format=fmt, **({"pnginfo": pnginfo(info)} if info and fmt == "PNG" else {}))
        for tmp, path in zip(tmps, paths):
            _place(tmp, path, overwrite)
            placed.append(path)
        complete = True
    except OSError as e:
        raise EngineError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        discard(tmps)
        if not complete:
            discard(placed)


def discard(paths) -> None:
    for p in paths:
        _pending.discard(p)
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def discard_pending() -> None:
    """Remove every temporary file still being written (before a forced exit that skips `finally` blocks)."""
    discard(list(_pending))
