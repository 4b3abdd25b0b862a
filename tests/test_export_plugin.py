"""`python -m export plugin`: every requested variant compiles on this GPU-less machine and the index says how
to launch exactly what was written (names, files, hashes, argument list against the PTX entry)."""
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys

import torch

from conftest import DEVICE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Triton 3.9 appends two pointers to every kernel's parameters (its launcher passes global and profile scratch)
SCRATCH = ("global_scratch", "profile_scratch")


def export(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def launch_arguments(monkeypatch, dtype: str) -> list[tuple[str, str, str]]:
    """(name, type, PTX parameter type) per kernel argument, independently of the index and the PTX: names from the
    @triton.jit function's Python signature without its constexprs, types from the values the PyTorch launcher
    passes (tensors: 64-bit pointers, ints: 32-bit), then Triton's scratch pointers."""
    import ipadapter_instruct.kernels.packed_attention as packed

    params = inspect.signature(packed._packed_fwd_kernel.fn).parameters.values()
    names = [p.name for p in params if "constexpr" not in str(p.annotation)]
    calls = []
    t = getattr(torch, dtype)
    r = lambda n: torch.zeros(2, n, 8 * 40, dtype=t, device=DEVICE)  # noqa: E731
    with monkeypatch.context() as m:  # the launcher's call recorded, not run
        m.setattr(packed, "_packed_fwd_kernel", type("Record", (), {
            "__getitem__": lambda self, grid: lambda *args, **kwargs: calls.append(args)})())
        packed.packed_attention(r(5), r(7), r(7), r(3), r(3), torch.ones(2, device=DEVICE), heads=8)
    (args,) = calls
    assert len(args) == len(names), (names, args)
    short = {torch.float16: "fp16", torch.float32: "fp32"}

    def kind(a):
        if isinstance(a, torch.Tensor):
            return f"*{short[a.dtype]}", "u64"
        assert type(a) is int, a
        return "i32", "u32"

    return [(n, *kind(a)) for n, a in zip(names, args)] + [(n, "ptr_null", "u64") for n in SCRATCH]


def test_every_plugin_variant_compiles_and_the_index_matches(tmp_path, monkeypatch):
    from ipadapter_instruct.export.plugin import ARCHS, DTYPES, HEAD_DIMS

    expected = {t: launch_arguments(monkeypatch, t) for t in DTYPES}
    for args in expected.values():  # TensorRT's AOT order: input pointers, int32 sizes, output pointer
        assert re.fullmatch(r"p+i+p", "".join("p" if t.startswith("*") else "i" for _, t, _ in args[:-len(SCRATCH)]))

    res = export("plugin", "--out", str(tmp_path))  # the default: every arch, dtype and head dim
    assert res.returncode == 0, res.stderr[-2000:]
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["plugin"]["name"] == "DecoupledAttention" and index["plugin"]["namespace"]
    got = [(v["arch"], v["dtype"], v["head_dim"]) for v in index["variants"]]
    assert sorted(got) == sorted((f"sm_{a}", t, d) for a in ARCHS for t in DTYPES for d in HEAD_DIMS)
    files = {v["cubin"] for v in index["variants"]} | {v["ptx"] for v in index["variants"]}
    assert files | {"index.json", "index.tsv"} == set(os.listdir(tmp_path))
    lines = (tmp_path / "index.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"))) for line in lines[1:]]
    assert [(r["cubin"], r["kernel_name"], int(r["threads_per_block"]), int(r["shared_bytes"]), int(r["block_m"]))
            for r in rows] == [(v["cubin"], v["kernel_name"], v["threads_per_block"], v["shared_bytes"],
                                v["block_m"]) for v in index["variants"]]
    for v in index["variants"]:
        cubin = (tmp_path / v["cubin"]).read_bytes()
        assert cubin and hashlib.sha256(cubin).hexdigest() == v["cubin_sha256"]
        ptx = (tmp_path / v["ptx"]).read_text()
        assert re.search(rf"\.target\s+{v['arch']}", ptx) and f".entry {v['kernel_name']}(" in ptx
        entry = ptx[ptx.index(f".entry {v['kernel_name']}("):]
        entry = entry[:entry.index(")")]
        assert [(a["name"], a["type"], a["ptx"]) for a in v["args"]] == expected[v["dtype"]]
        assert re.findall(r"\.param\s+\.(\w+)", entry) == [p for *_, p in expected[v["dtype"]]]
        assert v["threads_per_block"] == 32 * v["num_warps"] and v["global_scratch_size"] == 0
        assert v["grid"] == {"x": f"ceil(Lq / {v['block_m']})", "y": "B * 8", "z": 1}
        assert v["constexprs"]["HEADS"] == 8 and v["constexprs"]["HEAD_DIM"] == v["head_dim"]


def test_plugin_refuses_the_interpreter():
    res = export("plugin", "--out", "x", env_extra={"TRITON_INTERPRET": "1"})
    assert res.returncode == 2 and "unset TRITON_INTERPRET" in res.stderr
