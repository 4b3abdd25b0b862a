"""The TensorRT plugin's kernels, ahead of time: the fused decoupled attention as cubin + PTX per GPU arch,
dtype and head dim, with a JSON index that says exactly how to launch each one.

`python -m export plugin --out DIR` needs no GPU: Triton's compiler and its ptxas build for sm_80/86/89/90.
The index gives, per variant, the kernel's entry name, the files (and the cubin's sha256), threads per block,
dynamic shared memory, the grid rule and the full argument list in launch order, including the two scratch
pointers Triton appends (pass null: their sizes are 0). This is what the TensorRT plugin's ahead-of-time
implementation and the C++ launcher read. The plugin runs the inference launch: one adapter, no text mask,
no regional mask, the adapter strength per batch row (`Scale`, fp32, one value per row).
"""
from __future__ import annotations

import hashlib
import json
import os
import re

from engine.errors import EngineError

ARCHS = (80, 86, 89, 90)
DTYPES = ("float16", "float32")
HEAD_DIMS = (40, 64, 80, 160)
PLUGIN = {"name": "DecoupledAttention", "namespace": "ipadapter_instruct"}


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


def write_plugin(out: str, archs=ARCHS, dtypes=DTYPES, head_dims=HEAD_DIMS, log=print) -> str:
    """Compile every variant into `out` and write `out/index.json`; returns the index path."""
    import triton

    from kernels.aot import compile_kernel, forward_variant

    os.makedirs(out, exist_ok=True)
    variants = []
    for arch in archs:
        for dtype in dtypes:
            for d in head_dims:
                v = forward_variant(dtype, d)
                k = compile_kernel(v, arch)
                stem = f"decoupled_attention_{dtype}_d{d}_sm{arch}"
                cubin, ptx = k.asm["cubin"], k.asm["ptx"]
                for ext, data in (("cubin", cubin), ("ptx", ptx.encode())):
                    with open(os.path.join(out, f"{stem}.{ext}"), "wb") as f:
                        f.write(data)
                meta = k.metadata
                variants.append({
                    "arch": f"sm_{arch}", "dtype": dtype, "head_dim": d, "kernel_name": meta.name,
                    "cubin": f"{stem}.cubin", "ptx": f"{stem}.ptx", "cubin_sha256": hashlib.sha256(cubin).hexdigest(),
                    "num_warps": meta.num_warps, "threads_per_block": meta.num_warps * 32,
                    "shared_bytes": meta.shared, "global_scratch_size": meta.global_scratch_size,
                    "grid": {"x": f"ceil(Lq / {v['constexprs']['BLOCK_M']})", "y": "B * H", "z": 1},
                    "constexprs": v["constexprs"], "args": _args(v, ptx_params(ptx, meta.name)),
                })
                log(f"{stem}: {meta.name}, {meta.num_warps * 32} threads, {meta.shared} B shared")
    index = {"plugin": PLUGIN, "triton": triton.__version__,
             "inputs": "q (B,H,Lq,D), k/v (B,H,77,D), k_ip/v_ip (B,H,16,D), ip_scale (B,) fp32; out (B,Lq,H,D)",
             "variants": variants}
    path = os.path.join(out, "index.json")
    with open(path + ".tmp", "w") as f:
        json.dump(index, f, indent=1)
    os.replace(path + ".tmp", path)
    return path
