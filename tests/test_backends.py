"""The attention backend registry (kernels/backends.py): what each request resolves to, and that every fallback
reason is logged exactly once per process, at INFO when `auto` falls back and at WARNING when `triton` was asked
for by name, however many times the choice is made (the engine resolves it once per layer and per call).

Every reason is produced on this CPU: the choice reads only the device *type*, so `torch.device("cuda")` touches
no GPU; "triton missing" is simulated by making `import triton` fail.
"""
import logging
import sys

import pytest
import torch

import ipadapter_instruct.kernels._runtime as runtime
import ipadapter_instruct.kernels.backends as backends
from conftest import gpu
from ipadapter_instruct.engine.errors import EngineError

F16, F32 = torch.float16, torch.float32
# name: (TRITON_INTERPRET, device, dtype, head dim, triton importable, text of the logged reason, backends that
# fall back). Together: CPU tensors (with and without the interpreter), head dim over 256, an unsupported dtype,
# triton missing, and `triton` asked where it cannot run (CUDA tensors under the interpreter, another device)
REASONS = {
    "cpu-auto-interpreter": ("1", "cpu", F32, 40, True, "CPU tensors: the Triton interpreter is for tests", ("auto",)),
    "cpu-tensors": ("0", "cpu", F32, 40, True, "CPU tensors (Triton runs on CPU only under TRITON_INTERPRET=1)",
                    ("auto", "triton")),
    "head-dim": ("0", "cuda", F16, 320, True, "head dim 320 is over the kernel's 256", ("auto", "triton")),
    "dtype": ("0", "cuda", torch.float64, 40, True, "dtype torch.float64", ("auto", "triton")),
    "triton-missing": ("0", "cuda", F16, 40, False, "triton is not importable", ("auto", "triton")),
    "interpreter-on-cuda": ("1", "cuda", F16, 40, True, "TRITON_INTERPRET=1 is set", ("auto", "triton")),
    "other-device": ("0", "meta", F16, 40, True, "meta tensors (Triton kernels here target CUDA)", ("auto", "triton")),
}
LEVEL = {"auto": logging.INFO, "triton": logging.WARNING}


@pytest.fixture
def registry(monkeypatch):
    """A process that has logged nothing yet. Returns `conditions(interpret, importable)`, which sets
    TRITON_INTERPRET and whether `import triton` works, and re-runs the registry's (cached) import check."""
    import triton  # the real module (the kernels import it anyway), put back after a "missing" case
    monkeypatch.setattr(backends, "_logged", set())

    def conditions(interpret: str, importable: bool):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        monkeypatch.setitem(sys.modules, "triton", triton if importable else None)  # None: the import fails
        runtime.triton_import_error.cache_clear()

    yield conditions
    monkeypatch.undo()
    runtime.triton_import_error.cache_clear()


def fallback_records(caplog, reason):
    return [r for r in caplog.records if r.name == "ipadapter_instruct.kernels.backends" and reason in r.getMessage()]


def test_every_fallback_reason_is_logged_once_at_its_level(registry, caplog):
    caplog.set_level(logging.DEBUG, logger="ipadapter_instruct.kernels.backends")
    for _ in range(3):  # every choice made three times, the reasons interleaved as layers and calls would
        for interpret, device, dtype, head_dim, importable, _, fall_back in REASONS.values():
            registry(interpret, importable)
            for backend in ("auto", "triton", "sdpa", "reference"):
                want = "sdpa" if backend in fall_back else ("triton" if backend in ("auto", "triton") else backend)
                assert backends.choose(torch.device(device), dtype, head_dim, backend) == want, (device, backend)
    for name, (*_, reason, fall_back) in REASONS.items():
        got = fallback_records(caplog, reason)
        assert sorted((r.levelno, r.getMessage().split(" asked")[0]) for r in got) == \
            sorted((LEVEL[b], f"decoupled attention: {b}") for b in fall_back), name
    # nothing else was logged: sdpa/reference asked by name and triton where it runs are not fallbacks
    assert len(caplog.records) == sum(len(fb) for *_, fb in REASONS.values())


def test_a_reason_is_logged_again_in_a_fresh_process_only(registry, monkeypatch, caplog):
    registry("0", True)
    with caplog.at_level(logging.INFO, logger="ipadapter_instruct.kernels.backends"):
        for _ in range(5):
            backends.select(torch.zeros(1, 1, 4, 40), "triton")
    assert len(caplog.records) == 1 and caplog.records[0].levelno == logging.WARNING
    assert "triton asked, running sdpa because: CPU tensors" in caplog.text
    monkeypatch.setattr(backends, "_logged", set())  # what a new process starts from
    with caplog.at_level(logging.INFO, logger="ipadapter_instruct.kernels.backends"):
        backends.select(torch.zeros(1, 1, 4, 40), "triton")
    assert len(caplog.records) == 2


def test_sdpa_and_reference_are_taken_as_asked_and_unknown_names_refused():
    q = torch.zeros(1, 1, 4, 40)
    assert backends.select(q, "reference") == "reference" and backends.select(q, "sdpa") == "sdpa"
    with pytest.raises(EngineError, match="unknown attention backend 'flash'"):
        backends.select(q, "flash")


@gpu
def test_registry_picks_triton_for_cuda_tensors(registry, monkeypatch):
    registry("0", True)
    q = torch.zeros(1, 1, 4, 40, device="cuda", dtype=torch.float16)
    assert backends.select(q, "auto") == "triton" and backends.select(q, "triton") == "triton"
    assert backends.select(q.bfloat16(), "auto") == "triton" and backends.select(q.float(), "auto") == "triton"
    assert backends.select(q, "sdpa") == "sdpa"
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter cannot take CUDA tensors
    assert backends.select(q, "auto") == "sdpa"
