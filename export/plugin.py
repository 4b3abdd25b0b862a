"""The TensorRT plugin's kernels, ahead of time: the packed decoupled attention (kernels/packed_attention.py)
as cubin + PTX per GPU arch, dtype, head count and head size, with a JSON index that says how to launch each.

`python -m export plugin --out DIR` needs no GPU: Triton's compiler and its ptxas build for sm_80/86/89/90.
The index gives, per variant, the kernel's entry name, the files (and the cubin's sha256), threads per block,
shared memory, the grid rule and the full argument list in launch order: the input pointers (Q, K, V, KI, VI,
Scale), the int32 sizes (Lq, Lt, Li), the output pointer (Out), then the scratch pointers Triton appends (pass
null: their sizes are 0). That order is the one TensorRT's ahead-of-time plugins use (inputs, extra int32
arguments, outputs), and it is what export/cpp/ and the driver-API launch read. Tensors are packed
(B, L, H*D), contiguous; Scale is fp32 (B,), the adapter strength per batch row.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.trt.plugin import NAME, NAMESPACE

ARCHS = (80, 86, 89, 90)
DTYPES = ("float16", "float32")
HEAD_DIMS = (40, 64, 80, 160)
HEADS = 8  # every SD1.5 attention layer
PLUGIN = {"name": NAME, "namespace": NAMESPACE}  # one spelling: the TensorRT plugin's (engine/trt/plugin.py)


def ptx_params(ptx: str, entry: str) -> list[str]:
    """The .param types of the kernel's entry, in order (u64 pointers, f32, u32 ...)."""
    m = re.search(rf"\.entry\s+{re.escape(entry)}\s*\((.*?)\)", ptx, re.S)
    if m is None:
        raise EngineError(f"entry {entry} not found in the PTX")
    return re.findall(r"\.param\s+\.(\w+)", m.group(1))


def _args(variant: dict, params: list[str]) -> list[dict]:
    named = [(n, t) for n, t in variant["signature"].items() if t != "constexpr"]
    if len(params) < len(named):
        raise EngineError(f"PTX has {len(params)} parameters for {len(named)} kernel arguments")
    hidden = [f"hidden_{i}" for i in range(len(params) - len(named))]  # Triton's scratch pointers, passed null
    hidden[:2] = ["global_scratch", "profile_scratch"][:len(hidden)]
    out = [{"name": n, "type": t, "ptx": p} for (n, t), p in zip(named, params)]
    out += [{"name": n, "type": "ptr_null", "ptx": p} for n, p in zip(hidden, params[len(named):])]
    return out


def write_plugin(out: str, archs=ARCHS, dtypes=DTYPES, head_dims=HEAD_DIMS, heads: int = HEADS, log=print,
                 combos=None) -> str:
    """Compile every variant into `out` and write `out/index.json`; returns the index path. combos: the
    (dtype, heads, head_dim) to build, in place of dtypes x head_dims at `heads` (what a UNet engine uses)."""
    import triton

    from ipadapter_instruct.kernels.aot import compile_kernel, packed_variant

    os.makedirs(out, exist_ok=True)
    combos = sorted(set(combos)) if combos is not None else [(t, heads, d) for t in dtypes for d in head_dims]
    variants = []
    for arch in archs:
        for dtype, heads, d in combos:
            v = packed_variant(dtype, heads, d)
            k = compile_kernel(v, arch)
            stem = f"packed_attention_{dtype}_h{heads}_d{d}_sm{arch}"
            cubin, ptx = k.asm["cubin"], k.asm["ptx"]
            for ext, data in (("cubin", cubin), ("ptx", ptx.encode())):
                with open(os.path.join(out, f"{stem}.{ext}"), "wb") as f:
                    f.write(data)
            meta = k.metadata
            variants.append({
                "arch": f"sm_{arch}", "dtype": dtype, "heads": heads, "head_dim": d, "kernel_name": meta.name,
                "cubin": f"{stem}.cubin", "ptx": f"{stem}.ptx", "cubin_sha256": hashlib.sha256(cubin).hexdigest(),
                "num_warps": meta.num_warps, "threads_per_block": meta.num_warps * 32,
                "shared_bytes": meta.shared, "global_scratch_size": meta.global_scratch_size,
                "block_m": v["constexprs"]["BLOCK_M"],
                "grid": {"x": f"ceil(Lq / {v['constexprs']['BLOCK_M']})", "y": f"B * {heads}", "z": 1},
                "constexprs": v["constexprs"], "args": _args(v, ptx_params(ptx, meta.name)),
            })
            log(f"{stem}: {meta.name}, {meta.num_warps * 32} threads, {meta.shared} B shared")
    index = {"plugin": PLUGIN, "triton": triton.__version__,
             "layout": "q (B,Lq,H*D), k/v (B,Lt,H*D), k_ip/v_ip (B,Li,H*D) contiguous in dtype; ip_scale (B,) fp32; "
                       "out (B,Lq,H*D) in dtype",
             "variants": variants}
    # the same facts flat, one variant per line, for C++ readers with no JSON library (export/cpp/)
    cols = ("arch", "dtype", "heads", "head_dim", "cubin", "kernel_name", "threads_per_block", "shared_bytes",
            "block_m")
    tsv = "\t".join(cols) + "\n" + "".join("\t".join(str(v[c]) for c in cols) + "\n" for v in variants)
    for name, text in (("index.tsv", tsv), ("index.json", json.dumps(index, indent=1))):
        with open(os.path.join(out, name + ".tmp"), "w") as f:
            f.write(text)
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
    return os.path.join(out, "index.json")
