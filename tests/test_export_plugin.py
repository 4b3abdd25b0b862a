"""`python -m export plugin`: every requested variant compiles on this GPU-less machine and the index says how
to launch exactly what was written (names, files, hashes, argument list against the PTX entry)."""
import hashlib
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def export(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_every_plugin_variant_compiles_and_the_index_matches(tmp_path):
    from export.plugin import ARCHS, DTYPES, HEAD_DIMS

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
        assert [a["ptx"] for a in v["args"]] == re.findall(r"\.param\s+\.(\w+)", entry)
        names = [a["name"] for a in v["args"]]
        # TensorRT's AOT order: input pointers, int32 sizes, output pointer; then Triton's scratch pointers
        assert names == ["Q", "K", "V", "KI", "VI", "Scale", "Lq", "Lt", "Li", "Out", "global_scratch",
                         "profile_scratch"]
        t = {"float16": "*fp16", "float32": "*fp32"}[v["dtype"]]
        assert [a["type"] for a in v["args"][:10]] == [t] * 5 + ["*fp32", "i32", "i32", "i32", t]
        assert v["threads_per_block"] == 32 * v["num_warps"] and v["global_scratch_size"] == 0
        assert v["grid"] == {"x": f"ceil(Lq / {v['block_m']})", "y": "B * 8", "z": 1}
        assert v["constexprs"]["HEADS"] == 8 and v["constexprs"]["HEAD_DIM"] == v["head_dim"]


def test_plugin_refuses_the_interpreter():
    res = export("plugin", "--out", "x", env_extra={"TRITON_INTERPRET": "1"})
    assert res.returncode == 2 and "unset TRITON_INTERPRET" in res.stderr
