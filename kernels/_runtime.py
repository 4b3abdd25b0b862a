"""Where the Triton kernels can run: CUDA tensors normally, CPU tensors under TRITON_INTERPRET=1.

TRITON_INTERPRET is read when a kernel is decorated, so it must be set before `kernels` is imported
(the tests' conftest does this on machines without a GPU). Nothing here touches CUDA at import time.
"""
from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:  # not installed (non-Linux), or a broken install
        return f"triton is not importable ({e})"
    return None


def triton_unusable(device: torch.device) -> str | None:
    """None when a Triton kernel can run on tensors of `device`, else the reason it cannot."""
    err = triton_import_error()
    if err:
        return err
    if device.type == "cuda":
        if interpreting():
            return "TRITON_INTERPRET=1 is set, which runs kernels on the CPU only"
        return None
    if device.type == "cpu":
        return None if interpreting() else "CPU tensors (Triton runs on CPU only under TRITON_INTERPRET=1)"
    return f"{device.type} tensors (Triton kernels here target CUDA)"
