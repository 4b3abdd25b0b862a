"""The plugin's ahead-of-time kernels (`python -m export plugin`) launched through the CUDA driver API, no Triton.

`launch_variant` takes the cubin that index.json lists for this GPU's arch (sm_XY), the inputs' dtype, the head
count and the head size; loads it with cuModuleLoad (CuPy's RawModule) and launches it with cuLaunchKernel on
torch's current stream, its arguments in the index's order (Triton's scratch pointers null). That is the binary
TensorRT's plugin runs, so comparing it with `packed_attention_ref` checks what ships
(tests/test_export_launch.py); `launch_pointers` is the same launch on raw addresses, what the TensorRT
plugin's enqueue (engine/trt/plugin.py) makes. export/cpp/ makes the same launch from C++ with no Python.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os

import numpy as np
import torch

from ipadapter_instruct.kernels.errors import KernelError

SMEM_WITHOUT_OPT_IN = 48 * 1024  # dynamic shared memory a kernel gets before it raises its limit
# how each PTX parameter type is passed by value (pointers as 64-bit integers)
PTX_SCALARS = {"u64": np.uint64, "b64": np.uint64, "s64": np.int64, "u32": np.uint32, "b32": np.uint32,
               "s32": np.int32}


def pick_variant(plugin_dir: str, arch: str, dtype: str, heads: int, head_dim: int) -> dict:
    """The entry of `plugin_dir`/index.json for arch ("sm_90"), dtype ("float16"), heads and head_dim."""
    path = os.path.join(plugin_dir, "index.json")
    try:
        with open(path) as f:
            variants = json.load(f)["variants"]
    except FileNotFoundError:
        raise KernelError(f"no plugin index at {path}: build one with `python -m export plugin --out {plugin_dir}`") \
            from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise KernelError(f"{path} is not a plugin index ({type(e).__name__}: {e})") from None
    for v in variants:
        if (v["arch"], v["dtype"], v["heads"], v["head_dim"]) == (arch, dtype, heads, head_dim):
            return v
    have = ", ".join(f"{v['arch']} {v['dtype']} h{v['heads']} d{v['head_dim']}" for v in variants) or "nothing"
    raise KernelError(f"no variant for {arch} {dtype} heads={heads} head_dim={head_dim} in {path}; it has: {have} "
                      f"(`python -m export plugin --arch {arch.removeprefix('sm_')} --dtype {dtype} "
                      f"--head-dim {head_dim} --heads {heads}` builds it)")


def _cupy():
    try:
        import cupy
    except ImportError as e:
        raise KernelError(f"launching the plugin's cubins needs CuPy (pip install cupy-cuda12x), which does not "
                          f"import: {e}") from None
    return cupy


@functools.cache
def _kernel(path: str, name: str, sha256: str):
    # a RawKernel for the cubin's entry; CuPy loads the module once per device, on first use there
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise KernelError(f"cannot read the plugin's cubin {path}: {e.strerror}") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise KernelError(f"{path} is not the cubin index.json describes (sha256 differs): rebuild the plugin folder")
    return _cupy().RawModule(path=path).get_function(name)


def _argument(arg: dict, pointers: dict, sizes: dict):
    kind = PTX_SCALARS.get(arg["ptx"])
    if kind is None:
        raise KernelError(f"kernel argument {arg['name']} has PTX type .{arg['ptx']}, which this launcher cannot pass")
    if arg["type"] == "ptr_null":
        return kind(0)
    if arg["name"] in pointers:
        return kind(pointers[arg["name"]])
    if arg["name"] in sizes:
        return kind(sizes[arg["name"]])
    raise KernelError(f"index.json lists a kernel argument {arg['name']} this launcher does not know "
                      f"(it passes {', '.join([*pointers, *sizes])} and null scratch pointers)")


def launch_variant(plugin_dir: str, q, k, v, k_ip, v_ip, scale, heads: int) -> torch.Tensor:
    """`packed_attention_ref`'s contract, run by the plugin's cubin for this GPU; returns out (B, Lq, H*D).

    q: (B, Lq, H*D); k, v: (B, Lt, H*D); k_ip, v_ip: (B, Li, H*D), all float16 or all float32 on one CUDA
    device; scale: (B,) float.
    """
    from ipadapter_instruct.kernels.packed_attention import _check

    _check(q, k, v, k_ip, v_ip, scale, heads)
    if not torch.cuda.is_available():
        raise KernelError("launch_variant runs the plugin's cubins on a CUDA GPU, and torch sees none")
    tensors = dict(Q=q, K=k, V=v, KI=k_ip, VI=v_ip, Scale=scale)
    if q.device.type != "cuda" or any(t.device != q.device for t in tensors.values()):
        raise KernelError("q, k, v, k_ip, v_ip and scale must be on one CUDA device, got "
                          + ", ".join(f"{n} on {t.device}" for n, t in tensors.items()))
    big = [n for n, t in tensors.items() if t.numel() >= 2 ** 31]
    if big:
        raise KernelError(f"{', '.join(big)} has 2**31 elements or more; the kernel indexes with int32")
    b, lq, width = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    major, minor = torch.cuda.get_device_capability(q.device)
    pointers = {n: t.contiguous() for n, t in tensors.items()}
    pointers.update(Scale=scale.to(torch.float32).contiguous(), Out=out)
    launch_pointers(plugin_dir, {n: t.data_ptr() for n, t in pointers.items()}, str(q.dtype).removeprefix("torch."),
                    heads, width, (b, lq, k.shape[1], k_ip.shape[1]), f"sm_{major}{minor}",
                    torch.cuda.current_stream(q.device).cuda_stream, q.device.index)
    return out


def launch_pointers(plugin_dir: str, pointers: dict, dtype: str, heads: int, width: int, sizes: tuple, arch: str,
                    stream: int, device: int) -> None:
    """The launch itself, on raw device pointers (what a TensorRT plugin's enqueue has): pointers {Q, K, V, KI, VI,
    Scale, Out: address}, sizes (B, Lq, Lt, Li), arch "sm_XY", stream a cudaStream_t as an int."""
    cupy = _cupy()
    b, lq, lt, li = sizes
    variant = pick_variant(plugin_dir, arch, dtype, heads, width // heads)
    args = tuple(_argument(a, pointers, dict(Lq=lq, Lt=lt, Li=li)) for a in variant["args"])
    grid = (-(-lq // variant["block_m"]), b * heads, 1)
    shared = variant["shared_bytes"]
    path = os.path.join(plugin_dir, variant["cubin"])
    try:
        with cupy.cuda.Device(device):
            kernel = _kernel(os.path.abspath(path), variant["kernel_name"], variant["cubin_sha256"])
            if shared > SMEM_WITHOUT_OPT_IN:
                kernel.max_dynamic_shared_size_bytes = shared
            with cupy.cuda.ExternalStream(stream):
                kernel(grid, (variant["threads_per_block"], 1, 1), args, shared_mem=shared)
    except cupy.cuda.driver.CUDADriverError as e:
        raise KernelError(f"launching {path} ({variant['kernel_name']}) failed: {e}") from None
