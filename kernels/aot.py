"""Ahead-of-time compilation of the kernels for NVIDIA GPUs, on any machine (no GPU or driver needed).

`python -m ipadapter_instruct.kernels.aot [--arch 90] [--json PATH] [--markdown]` runs the engine's own launchers on CPU tensors
of SD1.5 sizes (attention in the UNet's layout, inference and one training step; the projector's attention
and FF blocks; GroupNorm+SiLU and GEGLU) with every launch handed to Triton's JIT for the chosen GPU instead
of run, so each kernel is compiled exactly as the real call would compile it: the launcher's constexprs and
num_warps/num_stages, and the specialisation the JIT derives from the real arguments (16-byte aligned
pointers and integers divisible by 16 marked `tt.divisibility`, integers equal to 1 made constants). The
TensorRT plugin's packed kernel is compiled from its fixed AOT signature (no size specialisation: one cubin
serves every shape). Each cubin is rebuilt from its PTX by Triton's own ptxas step with `-v`, whose report
gives registers, stack and spills (a report that does not parse is an error, never a silent 0). Must run
with TRITON_INTERPRET unset (the interpreter replaces the kernels with Python functions).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time

from ipadapter_instruct.kernels.errors import KernelError

DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
HEAD_DIMS = (40, 64, 80, 160)
# one SD1.5 request at 512 px with classifier-free guidance: 2 rows, 8 heads, 77 text and 16 adapter tokens;
# each head dim at the query count of its UNet level (64x64, 32x32, 16x16 latents; d64 is not SD1.5's)
BATCH, HEADS, TEXT, IMAGE = 2, 8, 77, 16
QUERIES = {40: 4096, 64: 1024, 80: 1024, 160: 256}
# the projector's (IP-Adapter+ / IPAdapter-Instruct for SD1.5): width 768, 12 heads of 64, 16 queries,
# 257 ViT-H/14 image tokens, FF hidden width 4 x 768
PROJ_DIM, PROJ_HEADS, PROJ_QUERIES, PROJ_TOKENS, PROJ_HIDDEN = 768, 12, 16, 257, 3072
# SDXL at 1024 px (`--sdxl`): head dim 64 throughout, 10 heads (640 wide) at 64x64 latents and 20 (1280) at 32x32;
# the projector 1280 wide, 20 heads of 64, FF hidden 4 x 1280 (image stream) and 2 x 1280 (prompt, instruction)
SDXL_ATTENTION = ((10, 4096), (20, 1024))  # (heads, queries) per UNet level
SDXL_PROJ_DIM, SDXL_PROJ_HEADS, SDXL_PROJ_HIDDEN = 1280, 20, (5120, 2560)
TABLE_DTYPES, TABLE_HEAD_DIMS = ("float16", "bfloat16"), (40, 80, 160)
TABLE_KERNELS = {  # docs/testing.md's row label and the constexprs that make the tile
    "attention_fwd": ("attention forward", ("BLOCK_M", "BLOCK_D")),
    "attention_fwd_train": ("attention forward, training (stores the log-sum-exp)", ("BLOCK_M", "BLOCK_D")),
    "attention_bwd_text": ("attention backward, text branch", ("BLOCK_M", "BLOCK_D")),
    "attention_bwd_adapter": ("attention backward, adapter branch", ("BLOCK_M", "BLOCK_D")),
    "projector_attention": ("projector attention", ("BLOCK_Q", "DIM_HEAD")),
    "projector_ln_linear_gelu": ("projector FF (LayerNorm, Linear, GELU)", ("BLOCK_M", "BLOCK_H")),
}
_PTXAS = re.compile(r"Function properties for (\w+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
                    r"(\d+) bytes spill loads\s*\n[^\n]*: Used (\d+) registers")


def parse_ptxas(log: str, entry: str) -> dict:
    """Stack, spill and register counts of `entry` from ptxas -v; KernelError when the report does not match."""
    found = [m for m in _PTXAS.finditer(log) if m.group(1) == entry]
    if len(found) != 1:
        raise KernelError(f"ptxas -v report for {entry} does not match 'Function properties for {entry} / N bytes "
                          f"stack frame, N bytes spill stores, N bytes spill loads / Used N registers': {log!r}")
    stack, stores, loads, regs = (int(g) for g in found[0].groups()[1:])
    return dict(registers=regs, stack_bytes=stack, spill_stores=stores, spill_loads=loads)


def ptxas_usage(ptx: str, arch: int, options=None) -> dict:
    """Registers, stack and spills of the PTX's kernel, from Triton's own ptxas step (its flags, its ptxas)
    run with -v; `options` are the compiled kernel's (defaults otherwise). Also returns the cubin."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    entry = re.search(r"\.entry\s+(\w+)\s*\(", ptx)
    if entry is None:
        raise KernelError("no .entry in the PTX given to ptxas")
    backend = make_backend(GPUTarget("cuda", arch, 32))
    opts = backend.parse_options({} if options is None else options)
    log = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True  # Triton prints the -v report it always asks for
        cubin = backend.make_cubin(ptx, {}, opts, arch)
    return dict(parse_ptxas(log.getvalue(), entry.group(1)), cubin=cubin)


def divisible_args(ttir: str, entry: str) -> list[str]:
    """The kernel arguments the compiled TTIR marks `tt.divisibility = 16`."""
    m = re.search(rf"tt\.func public @{re.escape(entry)}\((.*)", ttir)
    if m is None:
        raise KernelError(f"tt.func {entry} not found in the TTIR")
    return [a for a, attrs in re.findall(r"%(\w+): \S+ \{([^}]*)\}", m.group(1)) if "tt.divisibility = 16" in attrs]


class _AotDriver:
    """The part of Triton's driver interface that JITFunction.run needs to compile (not launch) for a target."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return f"aot-sm_{self.target.arch}"  # the JIT's per-device cache: one per target

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return self.target


def _labels() -> list:
    import importlib

    # (modules by name: the package's `decoupled_attention` and `geglu` are the functions)
    fwd, bwd, proj, ff, gn, geglu = (importlib.import_module(f"ipadapter_instruct.kernels.{m}") for m in (
        "decoupled_attention", "decoupled_attention_bwd", "projector", "projector_ff", "groupnorm_silu", "geglu"))
    return [
        (fwd._fwd_kernel, lambda c: "attention_fwd_train" if c["STORE_LSE"] else "attention_fwd"),
        (bwd._bwd_kernel, lambda c: f"attention_bwd_{'adapter' if c['WEIGHTED'] else 'text'}"),
        (proj._perceiver_attention_kernel, lambda c: "projector_attention"),
        (ff._ln_linear_gelu_kernel, lambda c: "projector_ln_linear_gelu"),
        (gn._gn_silu_kernel,
         lambda c: f"groupnorm_silu_{'apply' if c['APPLY'] else 'stats'}{'_nhwc' if c['CHANNELS_LAST'] else ''}"),
        (geglu._geglu_kernel, lambda c: "geglu"),
    ]


@contextlib.contextmanager
def jit_compiling(arch: int):
    """Inside, every launch of the engine's kernels is compiled by Triton's JIT for sm_`arch` (`run` with
    warmup=True: the JIT's own specialisation of the real arguments) instead of run. Yields the list of
    launches: label, arguments by name, constexprs, compiled kernel, compile seconds."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    launches = []

    def compiling(kernel, label):
        def run(*args, grid, warmup, **kwargs):
            t0 = time.perf_counter()
            compiled = JITFunction.run(kernel, *args, grid=grid, warmup=True, **kwargs)
            named = dict(zip(kernel.arg_names, args), **{k: v for k, v in kwargs.items() if k in kernel.arg_names})
            const = {p.name: named[p.name] for p in kernel.params if p.is_constexpr}
            launches.append(dict(kernel=label(const), args=named, constexprs=const, compiled=compiled,
                                 compile_s=time.perf_counter() - t0))
        return run

    kernels = _labels()
    previous = driver._active  # (None until a real driver is first asked for: restored as it was)
    driver.set_active(_AotDriver(arch))
    for kernel, label in kernels:
        kernel.run = compiling(kernel, label)
    try:
        yield launches
    finally:
        for kernel, _ in kernels:
            del kernel.run
        driver.set_active(previous)


def _attention_workloads(dtype: str, d: int, num_heads: int = HEADS, lq: int | None = None) -> None:
    # the UNet's call: q, k, v, k_ip, v_ip are (B, L, H*D) projections viewed as (B, H, L, D); scale (B,)
    import torch

    from ipadapter_instruct.kernels.decoupled_attention import DecoupledAttentionFn, forward, normalize

    t = getattr(torch, dtype)
    lq = QUERIES[d] if lq is None else lq
    HEADS = num_heads  # noqa: N806 (the SD1.5 constant's name, this workload's value)

    def heads(n, grad):
        return torch.empty(BATCH, n, HEADS * d, dtype=t, requires_grad=grad).unflatten(-1, (HEADS, d)).transpose(1, 2)

    scale = torch.full((BATCH,), 0.8)
    for training in (False, True):  # as decoupled_attention calls them, past its device check
        q, k, v, ki, vi = (heads(n, training) for n in (lq, TEXT, TEXT, IMAGE, IMAGE))
        k_ips, v_ips, scales, ip_masks = normalize(q, k, v, ki, vi, scale, None, None)
        if not training:
            forward(q, k, v, k_ips, v_ips, scales, None, ip_masks)
            continue
        out = DecoupledAttentionFn.apply(len(k_ips), scales, None, ip_masks, q, k, v, *k_ips, *v_ips)
        out.transpose(1, 2).reshape(BATCH, lq, HEADS * d).backward(torch.empty(BATCH, lq, HEADS * d, dtype=t))


def _projector_workloads(dtype: str, dim: int = PROJ_DIM, num_heads: int = PROJ_HEADS,
                         hidden: tuple = (PROJ_HIDDEN,)) -> None:
    import torch

    from ipadapter_instruct.kernels.projector import _attention_heads
    from ipadapter_instruct.kernels.projector_ff import _ln_linear_gelu

    t = getattr(torch, dtype)
    e = lambda *shape: torch.empty(*shape, dtype=t)  # noqa: E731
    inner = num_heads * 64
    _attention_heads(e(BATCH, PROJ_TOKENS, dim), e(BATCH, PROJ_QUERIES, dim), e(dim), e(dim),
                     e(dim), e(dim), e(inner, dim), e(2 * inner, dim), num_heads, 1e-5)
    for h in hidden:
        _ln_linear_gelu(e(BATCH * PROJ_QUERIES, dim), e(dim), e(dim), e(h, dim), 1e-5)


def _elementwise_workloads(dtype: str, side: int = 64, geglu_width: int = 1280) -> None:
    # the first resnet block's GroupNorm+SiLU (320 channels at side x side, 32 groups, time embedding), both
    # layouts, and the first transformer block's GEGLU (4096 tokens, 2 x geglu_width); SD1.5: 64, 1280
    import torch

    from ipadapter_instruct.kernels.geglu import _geglu
    from ipadapter_instruct.kernels.groupnorm_silu import _group_norm_silu

    t = getattr(torch, dtype)
    x = torch.empty(BATCH, 320, side, side, dtype=t)
    for layout in (x, x.to(memory_format=torch.channels_last)):
        _group_norm_silu(layout, torch.empty(320, dtype=t), torch.empty(320, dtype=t), 32, 1e-5, True,
                         torch.empty(BATCH, 320, dtype=t))
    _geglu(torch.empty(BATCH, 4096, 2 * geglu_width, dtype=t))


def _sdxl_workloads(dtype: str, projector: bool, elementwise: bool) -> None:
    """What an SDXL request at 1024 px launches: attention at head dim 64 on both cross-attention levels, the
    IP-Adapter+ / IPAdapter-Instruct SDXL projector, GroupNorm+SiLU at 128x128 and GEGLU at 2 x 2560."""
    for heads, lq in SDXL_ATTENTION:
        _attention_workloads(dtype, 64, heads, lq)
    if projector:
        _projector_workloads(dtype, SDXL_PROJ_DIM, SDXL_PROJ_HEADS, SDXL_PROJ_HIDDEN)
    if elementwise:
        _elementwise_workloads(dtype, 128, 2560)


def packed_variant(dtype: str, heads: int, head_dim: int) -> dict:
    """The TensorRT plugin's kernel (packed layout, AOT argument order) at one dtype, head count and head size:
    signature, constexprs and options, with no argument specialisation (TensorRT passes any sizes)."""
    import torch

    from ipadapter_instruct.kernels.packed_attention import _packed_fwd_kernel, constexprs, num_warps

    t = DTYPES[dtype]
    const = constexprs(getattr(torch, dtype), heads, head_dim)
    sig = {n: f"*{t}" for n in ("Q", "K", "V", "KI", "VI", "Out")}
    sig.update(Scale="*fp32", Lq="i32", Lt="i32", Li="i32")
    sig.update({n: "constexpr" for n in const})
    sig = {n: sig[n] for n in _packed_fwd_kernel.arg_names}
    return dict(kernel=_packed_fwd_kernel, name="packed_attention", dtype=dtype, head_dim=head_dim,
                options=dict(num_warps=num_warps(getattr(torch, dtype), head_dim), num_stages=2),
                signature=sig, constexprs=const)


def compile_kernel(v: dict, arch: int):
    """Triton's compiled kernel (asm: ttir ... ptx, cubin; metadata) for a packed_variant, with no GPU involved."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(v["kernel"], v["signature"], constexprs=v["constexprs"])
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=v["options"])


def _row(kernel: str, dtype: str, d: int, arch: int, compiled, args: dict, constexprs: dict, compile_s: float,
         tile: str = "") -> dict:
    meta = compiled.metadata
    usage = ptxas_usage(compiled.asm["ptx"], arch, meta._asdict())
    if usage.pop("cubin") != compiled.asm["cubin"]:
        raise KernelError(f"{kernel} {dtype} d{d}: ptxas -v rebuilt a different cubin from Triton's PTX")
    divisible = set(divisible_args(compiled.asm["ttir"], meta.name))
    signature = compiled.src.signature
    described = [dict(name=n, type=signature[n], divisible=n in divisible,
                      **({"ptr_mod16": a.data_ptr() % 16} if hasattr(a, "data_ptr") else {"value": a}))
                 for n, a in args.items() if n not in constexprs]
    return dict(kernel=kernel, dtype=dtype, head_dim=d, arch=f"sm_{arch}", name=meta.name, tile=tile,
                num_warps=meta.num_warps, num_stages=meta.num_stages, shared_bytes=meta.shared,
                cubin_bytes=len(compiled.asm["cubin"]), compile_s=round(compile_s, 2), constexprs=constexprs,
                args=described, **usage)


def compile_all(arch: int, dtypes, head_dims, projector=True, elementwise=True, log=lambda row: None,
                sdxl: bool = False) -> list[dict]:
    """One row per compiled variant: the launches of the SD1.5 workloads (sdxl: SDXL's at 1024 px), then the
    plugin's packed kernel."""
    rows = []
    half = [t for t in dtypes if t != "float32"]
    for dtype in dtypes:
        with jit_compiling(arch) as launches:
            if sdxl:
                _sdxl_workloads(dtype, projector and dtype in half, elementwise and dtype in half)
            for d in head_dims if not sdxl else ():
                _attention_workloads(dtype, d)
            if projector and dtype in half and not sdxl:
                _projector_workloads(dtype)
            if elementwise and dtype in half and not sdxl:
                _elementwise_workloads(dtype)
        for la in launches:
            const = la["constexprs"]
            d = la["args"].get("D", 64 if la["kernel"].startswith("projector") else 0)  # the projector's: 64
            keys = TABLE_KERNELS.get(la["kernel"], (None, ()))[1]
            rows.append(_row(la["kernel"], dtype, d, arch, la["compiled"], la["args"], const, la["compile_s"],
                             "x".join(str(const[k]) for k in keys)))
            log(rows[-1])
        for d in (64,) if sdxl and dtype != "bfloat16" else head_dims if dtype != "bfloat16" else ():
            t0 = time.perf_counter()
            v = packed_variant(dtype, HEADS, d)
            compiled = compile_kernel(v, arch)
            rows.append(_row("packed_attention", dtype, d, arch, compiled, {n: None for n in v["signature"]},
                             v["constexprs"], time.perf_counter() - t0))
            log(rows[-1])
    return rows


def markdown(rows: list[dict]) -> str:
    """The table in docs/testing.md: per kernel and head dim, tile, warps, registers and spill stores (fp16 / bf16)."""
    arches = {r["arch"] for r in rows}
    if len(arches) != 1:
        raise KernelError(f"the table is for one arch, got rows for {sorted(arches)}")
    by = {(r["kernel"], r["head_dim"], r["dtype"]): r for r in rows}
    lines = [f"| kernel ({arches.pop()}; fp16 / bf16 where they differ) | head dim | tile | warps | registers | "
             "spill stores, loads (B) |", "|---|---|---|---|---|---|"]
    for kernel, (label, _) in TABLE_KERNELS.items():
        dims = TABLE_HEAD_DIMS if kernel.startswith("attention") else (64,)
        for d in dims:
            missing = [t for t in TABLE_DTYPES if (kernel, d, t) not in by]
            if missing:
                raise KernelError(f"the table needs {kernel} d{d} in {', '.join(missing)}: run with the default "
                                  f"dtypes and head dims")
            cells = [[str(f(by[kernel, d, t])) for t in TABLE_DTYPES] for f in (
                lambda r: r["tile"], lambda r: r["num_warps"], lambda r: r["registers"],
                lambda r: f"{r['spill_stores']}, {r['spill_loads']}")]
            lines.append("| " + " | ".join([label, str(d)] + [c[0] if len(set(c)) == 1 else " / ".join(c)
                                                               for c in cells]) + " |")
    return "\n".join(lines) + "\n"


def _line(r: dict) -> str:
    return (f"{r['kernel']:>26} {r['dtype']:>8} d{r['head_dim']:<3} {r['arch']}: {r['registers']:3d} regs, "
            f"spills {r['spill_stores']}/{r['spill_loads']} B, stack {r['stack_bytes']} B, shared {r['shared_bytes']}"
            f" B, {r['num_warps']} warps, cubin {r['cubin_bytes']} B, {r['compile_s']} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ipadapter_instruct.kernels.aot", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10: 80, 86, 89, 90 (default)")
    p.add_argument("--dtype", choices=list(DTYPES), action="append", help="repeatable; default: all")
    p.add_argument("--head-dim", type=int, choices=HEAD_DIMS, action="append", help="repeatable; default: all")
    p.add_argument("--no-projector", action="store_true", help="only the attention kernels")
    p.add_argument("--no-elementwise", action="store_true", help="leave out GroupNorm+SiLU and GEGLU")
    p.add_argument("--sdxl", action="store_true",
                   help="SDXL's launches at 1024 px (head dim 64, 10 and 20 heads; the 1280-wide projector) instead "
                        "of SD1.5's; --head-dim and --markdown do not apply")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument("--markdown", action="store_true",
                   help="print only docs/testing.md's table on stdout (progress on stderr)")
    a = p.parse_args(argv)
    if a.sdxl and (a.markdown or a.head_dim):
        print("python -m ipadapter_instruct.kernels.aot: error: --sdxl compiles SDXL's own launches (head dim 64): drop --head-dim and "
              "--markdown (docs/testing.md's table is SD1.5's)", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("python -m ipadapter_instruct.kernels.aot: error: unset TRITON_INTERPRET (the interpreter cannot compile)", file=sys.stderr)
        return 2
    out = sys.stderr if a.markdown else sys.stdout
    try:
        rows = compile_all(a.arch, tuple(a.dtype or DTYPES), tuple(a.head_dim or HEAD_DIMS), not a.no_projector,
                           not a.no_elementwise, log=lambda r: print(_line(r), file=out, flush=True), sdxl=a.sdxl)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)
        if a.markdown:
            print(markdown(rows), end="")
    except KernelError as e:
        print(f"python -m ipadapter_instruct.kernels.aot: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
