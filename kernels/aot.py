"""Ahead-of-time compilation of the kernels for NVIDIA GPUs, on any machine (no GPU or driver needed).

`python -m kernels.aot [--arch 90] [--json PATH]` compiles every kernel variant the engine launches at
SD1.5 shapes (decoupled attention forward and backward for head dims 40/64/80/160 in fp16, bf16 and
fp32; the TensorRT plugin's packed forward in fp16 and fp32; the projector's attention and FF kernels;
GroupNorm+SiLU and GEGLU) with Triton's own compiler down to PTX and cubin, then asks ptxas for each
kernel's registers, spills and shared memory. Where no GPU is lent this is the check that the kernels are
legal for the real compiler, not only for the interpreter. Must run with TRITON_INTERPRET unset (the
interpreter replaces the kernels with Python functions).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
HEAD_DIMS = (40, 64, 80, 160)


def _signature(kernel, pointers: dict[str, str], floats: set[str], constexprs: dict) -> dict[str, str]:
    # every argument typed: pointers as given, floats fp32, constexprs, the rest (sizes, strides) i32
    return {n: pointers.get(n) or ("constexpr" if n in constexprs else "fp32" if n in floats else "i32")
            for n in kernel.arg_names}


def forward_variant(dtype: str, d: int) -> dict:
    """The inference launch of the fused attention (one adapter, no masks; Lt 77, Li 16) for a dtype and head dim:
    what the engine runs at SD1.5 shapes and what the TensorRT plugin ships."""
    from .decoupled_attention import _fwd_kernel, dot_precision, key_block, launch_config
    import torch

    t = DTYPES[dtype]
    cfg = launch_config(d, 4096, getattr(torch, dtype).itemsize)
    opts = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
    ptrs = {n: f"*{t}" for n in ("Q", "K", "V", "KI", "VI", "Out")}
    ptrs.update(Mask="*i8", Scale="*fp32", IpMask="*fp32", Offs="*i32", LseT="*fp32", LseI="*fp32")
    const = dict(NUM_ADAPTERS=1, HAS_MASK=False, HAS_IP_MASK=False, STORE_LSE=False,
                 PRECISION=dot_precision(getattr(torch, dtype)), BLOCK_N=key_block(77), BLOCK_I=key_block(16), **cfg)
    return dict(kernel=_fwd_kernel, name="attention_fwd", dtype=dtype, head_dim=d, options=opts,
                signature=_signature(_fwd_kernel, ptrs, {"qk_scale"}, const), constexprs=const)


def packed_variant(dtype: str, heads: int, head_dim: int) -> dict:
    """The TensorRT plugin's kernel (packed layout, AOT argument order) at one dtype, head count and head size."""
    import torch

    from .packed_attention import _packed_fwd_kernel, constexprs, num_warps

    t = DTYPES[dtype]
    const = constexprs(getattr(torch, dtype), heads, head_dim)
    sig = {n: f"*{t}" for n in ("Q", "K", "V", "KI", "VI", "Out")}
    sig.update(Scale="*fp32", Lq="i32", Lt="i32", Li="i32")
    sig.update({n: "constexpr" for n in const})
    sig = {n: sig[n] for n in _packed_fwd_kernel.arg_names}
    return dict(kernel=_packed_fwd_kernel, name="packed_attention", dtype=dtype, head_dim=head_dim,
                options=dict(num_warps=num_warps(getattr(torch, dtype), head_dim), num_stages=2),
                signature=sig, constexprs=const)


def attention_variants(dtypes=tuple(DTYPES), head_dims=HEAD_DIMS) -> list[dict]:
    """The decoupled-attention launches of one SD1.5 request (1 adapter, Lt 77, Li 16), per dtype and head dim."""
    from .decoupled_attention import dot_precision, key_block, launch_config
    from .decoupled_attention_bwd import _bwd_kernel
    import torch

    out = []
    for dtype in dtypes:
        t = DTYPES[dtype]
        precision = dot_precision(getattr(torch, dtype))
        itemsize = getattr(torch, dtype).itemsize
        for d in head_dims:
            out.append(forward_variant(dtype, d))
            if dtype != "bfloat16":
                out.append(packed_variant(dtype, 8, d))
            ptrs = {n: f"*{t}" for n in ("Q", "K", "V", "DO")}
            ptrs.update(DQ="*fp32", DK="*fp32", DV="*fp32", Lse="*fp32", Mask="*i8", Scale="*fp32", IpMask="*fp32")
            cfg = launch_config(d, 4096, itemsize, backward=True)
            opts = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
            const = dict(HAS_MASK=False, WEIGHTED=True, HAS_IP_MASK=False, ACCUMULATE=True, PRECISION=precision,
                         BLOCK_N=key_block(77), **cfg)
            out.append(dict(kernel=_bwd_kernel, name="attention_bwd", dtype=dtype, head_dim=d, options=opts,
                            signature=_signature(_bwd_kernel, ptrs, {"qk_scale", "sm_scale"}, const),
                            constexprs=const))
    return out


def projector_variants(dtypes=("float16", "bfloat16")) -> list[dict]:
    """The projector's two kernels at SD1.5 sizes (12 heads of 64, 16 queries)."""
    from . import projector, projector_ff
    import torch

    out = []
    for dtype in dtypes:
        t, precision = DTYPES[dtype], projector.dot_precision(getattr(torch, dtype))
        k = projector._perceiver_attention_kernel
        ptrs = {n: f"*{t}" for n in ("X", "LAT", "OUT", "N1_W", "N1_B", "N2_W", "N2_B", "WQ", "WKV")}
        const = dict(HEADS=12, DIM_HEAD=64, BLOCK_Q=16, BLOCK_N=projector.BLOCK_N, BLOCK_K=projector.BLOCK_K,
                     PRECISION=precision)
        out.append(dict(kernel=k, name="projector_attention", dtype=dtype, head_dim=64,
                        options=dict(num_warps=projector.NUM_WARPS),
                        signature=_signature(k, ptrs, {"eps", "qk_scale"}, const), constexprs=const))
        k = projector_ff._ln_linear_gelu_kernel
        ptrs = {n: f"*{t}" for n in ("X", "Y", "LN_W", "LN_B", "W")}
        const = dict(BLOCK_M=projector_ff.BLOCK_M, BLOCK_H=projector_ff.BLOCK_H, BLOCK_K=projector_ff.BLOCK_K,
                     PRECISION=precision)
        out.append(dict(kernel=k, name="projector_ln_linear_gelu", dtype=dtype, head_dim=64,
                        options=dict(num_warps=projector_ff.NUM_WARPS),
                        signature=_signature(k, ptrs, {"eps"}, const), constexprs=const))
    return out


def elementwise_variants(dtypes=("float16", "bfloat16")) -> list[dict]:
    """GroupNorm+SiLU (statistics and apply passes, NCHW and channels-last) and GEGLU."""
    from . import groupnorm_silu
    from .geglu import BLOCK_COLS, BLOCK_ROWS, _geglu_kernel  # (the package's `geglu` is the function)

    out = []
    for dtype in dtypes:
        t = DTYPES[dtype]
        k = groupnorm_silu._gn_silu_kernel
        ptrs = {n: f"*{t}" for n in ("X", "Y", "W", "B", "S")}
        ptrs["Part"] = "*fp32"
        for apply in (False, True):
            for cl in (False, True):
                const = dict(SPLIT=16, APPLY=apply, SILU=True, HAS_SHIFT=True, CHANNELS_LAST=cl,
                             BLOCK=groupnorm_silu.BLOCK)
                out.append(dict(kernel=k, name=f"groupnorm_silu_{'apply' if apply else 'stats'}"
                                f"{'_nhwc' if cl else ''}", dtype=dtype, head_dim=0, options=dict(num_warps=4),
                                signature=_signature(k, ptrs, {"eps"}, const), constexprs=const))
        k = _geglu_kernel
        const = dict(BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLS=BLOCK_COLS)
        out.append(dict(kernel=k, name="geglu", dtype=dtype, head_dim=0, options=dict(num_warps=4),
                        signature=_signature(k, {"X": f"*{t}", "Y": f"*{t}"}, set(), const), constexprs=const))
    return out


def ptxas_usage(ptx: str, arch_major: int) -> dict:
    """Registers and spill bytes per ptxas -v (the ptxas Triton itself uses for this arch), for the PTX's target."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch_major).path
    arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"aot-{os.getpid()}.ptx")
    with open(path, "w") as f:
        f.write(ptx)
    try:
        res = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", path, "-o", os.devnull], capture_output=True,
                             text=True, check=True)
    finally:
        os.remove(path)
    info = res.stderr
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, info)) else 0  # noqa: E731
    return dict(registers=num(r"Used (\d+) registers"), spill_stores=num(r"(\d+) bytes spill stores"),
                spill_loads=num(r"(\d+) bytes spill loads"))


def compile_kernel(v: dict, arch: int):
    """Triton's compiled kernel (asm: ttir ... ptx, cubin; metadata) for a variant, with no GPU involved."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(v["kernel"], v["signature"], constexprs=v["constexprs"])
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=v["options"])


def compile_variant(v: dict, arch: int) -> dict:
    t0 = time.perf_counter()
    compiled = compile_kernel(v, arch)
    usage = ptxas_usage(compiled.asm["ptx"], arch)
    return dict(kernel=v["name"], dtype=v["dtype"], head_dim=v["head_dim"], arch=f"sm_{arch}",
                name=compiled.metadata.name, num_warps=compiled.metadata.num_warps,
                shared_bytes=compiled.metadata.shared, cubin_bytes=len(compiled.asm["cubin"]),
                compile_s=round(time.perf_counter() - t0, 2), **usage)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.aot", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10: 80, 86, 89, 90 (default)")
    p.add_argument("--dtype", choices=list(DTYPES), action="append", help="repeatable; default: all")
    p.add_argument("--head-dim", type=int, choices=HEAD_DIMS, action="append", help="repeatable; default: all")
    p.add_argument("--no-projector", action="store_true", help="only the attention kernels")
    p.add_argument("--no-elementwise", action="store_true", help="leave out GroupNorm+SiLU and GEGLU")
    p.add_argument("--json", default=None, help="also write the table as JSON rows here")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("python -m kernels.aot: error: unset TRITON_INTERPRET (the interpreter cannot compile)", file=sys.stderr)
        return 2
    dtypes = tuple(a.dtype or DTYPES)
    variants = attention_variants(dtypes, tuple(a.head_dim or HEAD_DIMS))
    if not a.no_projector:
        variants += projector_variants(tuple(d for d in dtypes if d != "float32"))
    if not a.no_elementwise:
        variants += elementwise_variants(tuple(d for d in dtypes if d != "float32"))
    rows = []
    for v in variants:
        r = compile_variant(v, a.arch)
        rows.append(r)
        print(f"{r['kernel']:>24} {r['dtype']:>8} d{r['head_dim']:<3} {r['arch']}: {r['registers']:3d} regs, "
              f"spills {r['spill_stores']}/{r['spill_loads']} B, shared {r['shared_bytes']} B, "
              f"{r['num_warps']} warps, cubin {r['cubin_bytes']} B, {r['compile_s']} s", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
