"""Diffusers model folders (or hub ids): finding one, telling SD1.5 from SDXL, and loading one part of it (a model,
a tokenizer, the scheduler) with a one-line error naming the part and the folder.

Light at import: diffusers is imported by the loaders only.
"""
from __future__ import annotations

import json
import os
import re

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.safe_load import load_error

BASE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve(path_or_id, what: str) -> str:
    """A local folder, or a hub id ("org/name") left for from_pretrained to fetch."""
    p = os.path.expanduser(os.fspath(path_or_id))
    if os.path.exists(p):
        if not os.path.isdir(p):
            raise EngineError(f"{what} must be a folder, got a file: {p}")
        return p
    if HUB_ID.match(p) and not p.startswith("."):
        return p
    raise EngineError(f"{what} not found: {p}")


def is_sdxl_folder(src) -> bool:
    """Whether a local diffusers folder is an SDXL one (a second text encoder and tokenizer beside the first)."""
    return all(os.path.isdir(os.path.join(src, p)) for p in ("text_encoder_2", "tokenizer_2"))


def index_flag(src, name: str) -> bool:
    """A flag of a local folder's model_index.json (diffusers' pipeline config, e.g. SDXL's
    requires_aesthetics_score); False for a hub id, a single file or a folder without it."""
    path = os.path.join(os.fspath(src), "model_index.json")
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as fh:
            return bool(json.load(fh).get(name, False))
    except (OSError, ValueError, AttributeError) as e:
        raise EngineError(f"cannot read {path}: {e}") from None


def load_part(what: str, fn, *args, **kwargs):
    """fn(*args, **kwargs), its failure one EngineError naming `what` (and the folder, args[0], when it is one)."""
    try:
        return fn(*args, **kwargs)
    except EngineError:
        raise
    except Exception as e:  # from_pretrained raises OSError, ValueError, JSON and safetensors errors
        folder = args[0] if args and isinstance(args[0], (str, os.PathLike)) else None
        raise load_error(what, e, folder) from e


def folder_scheduler(src: str):
    """The scheduler of a diffusers folder (or hub id), of the class its scheduler_config.json names."""
    from diffusers import schedulers as dsched  # deferred: diffusers is heavy

    config = load_part(f"scheduler config from {src}", dsched.DDIMScheduler.load_config, src,
                       subfolder="scheduler")
    cls = getattr(dsched, config.get("_class_name", ""), None)
    if cls is None:
        raise EngineError(f"unknown scheduler class {config.get('_class_name')!r} in {src}/scheduler")
    return cls.from_config(config)

