"""The fast path checks itself: no user gets a wrong image or a crash from a kernel, graph or compiled graph that has
never met their GPU.

The first time a fast-path component runs at a new shape and dtype (the fused decoupled attention, GroupNorm+SiLU,
GEGLU, the projector kernels, a CUDA-graph replay of the UNet step, a compiled UNet), `SelfCheck.run` runs the eager
component for the same call beside it and compares both with an fp32 reference by the kernels' rule (the suite's,
flash-attention's): the fast output's error may be at most twice the eager component's own error in that dtype, plus
ATOL x the reference's largest magnitude (at least 1). When the fast component raises or misses, that shape runs the
eager component from then on, one warning names the component, shape, dtype and error, and the call goes on with
the eager result. A verdict is kept per (component, shape key), so each new shape costs one extra eager call (and,
below fp32, one fp32 reference); `report()` says what runs fused, what fell back and why, and what the checks cost.

The fp32 reference of a module (the projector, the UNet) runs it with its parameters upcast for that one call
(`torch.func.functional_call`), with every fused component inside it on its eager path (`eager_only`). Where that
reference cannot be computed (out of memory), the component is kept, marked unverified, with a warning.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import threading
import time

import torch

log = logging.getLogger(__name__)

FACTOR = 2.0
ATOL = {torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 5e-3}
_EAGER = contextvars.ContextVar("engine_selfcheck_eager", default=False)  # per thread/task: isolation between calls


@dataclasses.dataclass
class Verdict:
    component: str
    shape: str
    dtype: str
    status: str                  # "ok" (the fast path runs), "fallback" (the eager one runs), "unverified"
    reason: str = ""
    error: float | None = None   # max |fast - reference|
    bound: float | None = None   # what the rule allows
    check_ms: float = 0.0        # what the check cost beyond the fast call itself


def eager_only() -> bool:
    """Whether fused components should run their eager path now (inside a reference computation)."""
    return _EAGER.get()


@contextlib.contextmanager
def eager_mode():
    token = _EAGER.set(True)
    try:
        yield
    finally:
        _EAGER.reset(token)


def describe(value) -> str:
    """A shape key's text: tensors as their dims, tuples bracketed, None and numbers as such."""
    if isinstance(value, torch.Tensor):
        return "x".join(map(str, value.shape)) or "scalar"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in value) + ")"
    return "-" if value is None else type(value).__name__


def shape_key(*values) -> tuple:
    """What decides which code a kernel runs: shapes, dtypes and memory layout of the tensors, None or not."""
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append((tuple(v.shape), v.dtype, v.is_contiguous(), v.is_contiguous(memory_format=torch.channels_last)
                        if v.ndim == 4 else False))
        elif isinstance(v, (tuple, list)):
            out.append(shape_key(*v))
        else:
            out.append(None if v is None else type(v).__name__)
    return tuple(out)


def upcast(value):
    """Floating tensors (inside tuples, lists and dicts too) in fp32; everything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(upcast(v) for v in value)
    if isinstance(value, dict):
        return {k: upcast(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # e.g. the UNet's AdapterContext
        return dataclasses.replace(value, **{f.name: upcast(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    return value


def precision(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype whose rounding the eager path really has: fp32 on a CUDA GPU with TF32 allowed rounds like fp16."""
    if dtype == torch.float32 and device.type == "cuda" and (torch.backends.cuda.matmul.allow_tf32
                                                             or torch.backends.cudnn.allow_tf32):
        return torch.float16
    return dtype


def module_fp32(module: torch.nn.Module, *args, **kwargs):
    """module(*args, **kwargs) in fp32, uncompiled, every fused component inside on its eager path: the reference.
    The parameters are upcast for this call only (the module itself is not touched)."""
    class _Plain(torch.nn.Module):  # calls the module's uncompiled forward (Module.compile in place swaps __call__)
        def __init__(self):
            super().__init__()
            self.m = module

        def forward(self, *a, **k):
            return self.m._call_impl(*a, **k)

    state = {f"m.{n}": upcast(t) for n, t in (*module.named_parameters(), *module.named_buffers())}
    with eager_mode(), torch.no_grad():
        return torch.func.functional_call(_Plain(), state, upcast(args), upcast(kwargs))


def compare(fast: torch.Tensor, eager: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype,
            factor: float = FACTOR) -> tuple[bool, float, float, str]:
    """The kernels' rule on one output -> (ok, error, bound, why not). Positions where the reference is not finite
    (SDPA's all-masked rows) are left out; elsewhere a non-finite fast value fails."""
    if tuple(fast.shape) != tuple(reference.shape):
        return False, float("inf"), 0.0, f"shape {describe(fast)}, the reference's {describe(reference)}"
    ref = reference.float()
    finite = torch.isfinite(ref)
    got = fast.float()[finite]
    if not torch.isfinite(got).all():
        return False, float("inf"), 0.0, "non-finite values where the reference has none"
    want = ref[finite]
    err = (got - want).abs().max().item() if want.numel() else 0.0
    base = torch.nan_to_num((eager.float()[finite] - want).abs(), nan=0.0).max().item() if want.numel() else 0.0
    scale = max(1.0, want.abs().max().item() if want.numel() else 0.0)
    bound = factor * base + ATOL.get(dtype, ATOL[torch.float16]) * scale
    ok = err <= bound
    return ok, err, bound, "" if ok else f"max error {err:.3g} over the bound {bound:.3g}"


class SelfCheck:
    """First-use verdicts of one pipeline's fast-path components (shared by its calls: a fact about this GPU and
    these kernels, not a call's state)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._verdicts: dict[tuple, Verdict] = {}
        self._lock = threading.Lock()

    def run(self, component: str, key: tuple, fast, eager, reference=None, dtype: torch.dtype = torch.float32,
            device: torch.device | str = "cpu", shape: str | None = None):
        """fast(), eager(), reference(): the component's output for this call (reference: in fp32; None when eager
        is fp32 already). Returns what the call should use."""
        if not self.enabled or eager_only():
            return eager() if eager_only() else fast()
        verdict = self._verdicts.get((component, key))
        if verdict is not None:
            return eager() if verdict.status == "fallback" else fast()
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return fast()  # (a capture replays what its warm-up already checked; no host sync may happen here)
        shape = shape or str(key)
        name = str(dtype).removeprefix("torch.")
        try:
            out = fast()
        except Exception as e:  # the fast component crashed at this shape: the eager one serves it from now on
            t1 = time.perf_counter()
            want = eager()
            first = (str(e).splitlines() or [""])[0][:300]
            return self._decide(key, Verdict(component, shape, name, "fallback",
                                             f"raised {type(e).__name__}: {first}"), want, t1, device)
        t1 = time.perf_counter()
        with torch.no_grad():
            want = eager()
        try:
            ref = want if reference is None else reference()
        except torch.cuda.OutOfMemoryError as e:
            reason = f"the fp32 reference did not fit in memory ({(str(e).splitlines() or [''])[0][:120]})"
            return self._decide(key, Verdict(component, shape, name, "unverified", reason), out, t1, device)
        factor = 2 * FACTOR if dtype == torch.bfloat16 and _interpreting() else FACTOR
        ok, err, bound, why = compare(out, want, ref, precision(dtype, torch.device(device)), factor)
        verdict = Verdict(component, shape, name, "ok" if ok else "fallback", why, err, bound)
        return self._decide(key, verdict, out if ok else want, t1, device)

    def _decide(self, key: tuple, verdict: Verdict, result, since: float, device):
        # since: when the fast call ended (what comes after is the check's cost)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        verdict.check_ms = round((time.perf_counter() - since) * 1e3, 3)
        with self._lock:
            self._verdicts[(verdict.component, key)] = verdict
        if verdict.status != "ok":
            action = "runs its eager path at this shape from now on" if verdict.status == "fallback" else \
                "keeps the fast path unchecked"
            log.warning("fast-path self-check: %s at %s, %s %s: %s", verdict.component, verdict.shape,
                        verdict.dtype, action, verdict.reason)
        return result

    def forget(self, *components: str) -> None:
        """Drop the verdicts of these components (their graphs were captured or compiled again)."""
        with self._lock:
            self._verdicts = {k: v for k, v in self._verdicts.items() if v.component not in components}

    def verdicts(self) -> list[Verdict]:
        with self._lock:
            return list(self._verdicts.values())

    def report(self, fused: dict[str, str]) -> dict:
        """fused: component -> what it runs on (e.g. {"decoupled_attention": "triton"}) -> the report's dict."""
        verdicts = self.verdicts()
        return {"verify": self.enabled, "fused": dict(fused),
                "checked": sum(v.status == "ok" for v in verdicts),
                "fell_back": [dataclasses.asdict(v) for v in verdicts if v.status == "fallback"],
                "unverified": [dataclasses.asdict(v) for v in verdicts if v.status == "unverified"],
                "check_ms": round(sum(v.check_ms for v in verdicts), 3),
                "checks": [dataclasses.asdict(v) for v in verdicts]}


def summary(report: dict) -> str:
    """One line for a warm-up: what was checked, what fell back, and what the checks cost."""
    if not report["verify"]:
        return "fast-path self-check off (verify_fast_path=False)"
    fell = ", ".join(f"{v['component']} at {v['shape']}" for v in report["fell_back"])
    return (f"fast-path self-check: {report['checked']} component shapes checked, {len(report['fell_back'])} fell "
            f"back to eager{f' ({fell})' if fell else ''}, {len(report['unverified'])} unverified; "
            f"the checks cost {report['check_ms']:.0f} ms")


def _interpreting() -> bool:
    from ipadapter_instruct.kernels._runtime import interpreting
    return interpreting()
