"""The kernels compile for a real GPU (sm_90) on this machine, with Triton's own JIT, compiler and ptxas.

The interpreter accepts programs the GPU compiler rejects, so where no GPU is lent this is the check that
the code the engine launches on CUDA is legal, and what it costs in registers. `python -m ipadapter_instruct.kernels.aot` runs
in a child process with TRITON_INTERPRET unset (the session's kernels are interpreted ones), once for the
module: every SD1.5 launch at docs/testing.md's table's dtypes and head dims (70-90 s cold on 2 cores, ~15 s
with Triton's cache warm).
"""
import json
import os
import subprocess
import sys

import pytest

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.kernels.aot import IMAGE, QUERIES, TABLE_KERNELS, TEXT, markdown, parse_ptxas

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "TRITON_DEFAULT_FP_FUSION": "1"}
DTYPES, HEAD_DIMS = ("float16", "bfloat16"), (40, 80, 160)
ATTENTION = ("attention_fwd", "attention_fwd_train", "attention_bwd_text", "attention_bwd_adapter")
ELEMENTWISE = ("groupnorm_silu_stats", "groupnorm_silu_stats_nhwc", "groupnorm_silu_apply",
               "groupnorm_silu_apply_nhwc", "geglu")


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "rows.json"
    args = ["--arch", "90", "--markdown", "--json", str(out)]
    for t in DTYPES:
        args += ["--dtype", t]
    for d in HEAD_DIMS:
        args += ["--head-dim", str(d)]
    res = subprocess.run([sys.executable, "-m", "ipadapter_instruct.kernels.aot", *args], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout, json.loads(out.read_text())


def test_every_launch_compiles_for_sm90(aot):
    _, rows = aot
    got = sorted((r["kernel"], r["dtype"], r["head_dim"]) for r in rows)
    want = [(k, t, d) for k in ATTENTION for t in DTYPES for d in HEAD_DIMS]
    want += [("packed_attention", "float16", d) for d in HEAD_DIMS]  # the plugin ships no bf16
    want += [(k, t, 64) for k in ("projector_attention", "projector_ln_linear_gelu") for t in DTYPES]
    want += [(k, t, 0) for k in ELEMENTWISE for t in DTYPES]
    assert got == sorted(want)
    for r in rows:
        assert r["arch"] == "sm_90" and r["cubin_bytes"] > 0 and r["registers"] > 0, r


def test_launches_keep_the_launchers_own_configuration(aot):
    import importlib

    from ipadapter_instruct.kernels.decoupled_attention import key_block, launch_config

    projector, projector_ff = (importlib.import_module(f"ipadapter_instruct.kernels.{m}") for m in ("projector", "projector_ff"))

    for r in aot[1]:
        if r["kernel"] in ATTENTION:
            cfg = launch_config(r["head_dim"], QUERIES[r["head_dim"]], backward="bwd" in r["kernel"])
            assert (r["num_warps"], r["num_stages"]) == (cfg.pop("num_warps"), cfg.pop("num_stages")), r
            assert {k: r["constexprs"][k] for k in cfg} == cfg, r
            keys = IMAGE if r["kernel"] == "attention_bwd_adapter" else TEXT
            assert r["constexprs"]["BLOCK_N"] == key_block(keys), r
            assert r["tile"] == f"{cfg['BLOCK_M']}x{cfg['BLOCK_D']}"
        elif r["kernel"].startswith("projector"):
            module = projector if r["kernel"] == "projector_attention" else projector_ff
            assert r["num_warps"] == module.NUM_WARPS, r
            assert {k: v for k, v in vars(module).items() if k.startswith("BLOCK_")}.items() <= r["constexprs"].items()


def test_no_launch_spills_registers(aot):
    # every engine launch in fp16/bf16: the table's attention and projector kernels, GroupNorm+SiLU and GEGLU
    for r in aot[1]:
        if r["kernel"] != "packed_attention":
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r


def _jit_rule(arg: dict) -> tuple[str, bool]:
    """(type kind, divisible by 16) that Triton's JIT specialisation gives this real argument value."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    if "ptr_mod16" in arg:  # a tensor: its data pointer's alignment is all the JIT looks at
        return "pointer", arg["ptr_mod16"] == 0
    kind, attr = native_specialize_impl(BaseBackend, arg["value"], False, True, True)
    return ("constexpr" if kind == "constexpr" else "scalar"), attr == "D"


def test_compiled_with_the_jits_specialisation_of_the_real_arguments(aot):
    kinds = set()
    for r in aot[1]:
        if r["kernel"] == "packed_attention":
            assert not any(a["divisible"] for a in r["args"]), r  # one cubin for every size TensorRT passes
            continue
        for a in r["args"]:
            kind, divisible = _jit_rule(a)
            got = "constexpr" if a["type"] == "constexpr" else "pointer" if a["type"].startswith("*") else "scalar"
            assert (got, a["divisible"]) == (kind, divisible), (r["kernel"], a)
            kinds.add((kind, divisible))
    assert {("pointer", True), ("scalar", True), ("scalar", False), ("constexpr", False)} <= kinds
    fwd = next(r for r in aot[1] if r["kernel"] == "attention_fwd" and r["head_dim"] == 40)
    args = {a["name"]: a for a in fwd["args"]}
    # the UNet's layout: (B, L, H*D) projections viewed as (B, H, L, D)
    assert (args["stride_qm"]["value"], args["stride_qh"]["value"]) == (8 * 40, 40)
    assert args["stride_qm"]["divisible"] and not args["stride_qh"]["divisible"]


def test_readme_table_is_the_generated_one(aot):
    table, rows = aot
    assert table == markdown(rows) and table.count("\n") == 2 + sum(3 if k.startswith("attention") else 1
                                                                    for k in TABLE_KERNELS)
    with open(os.path.join(ROOT, "docs", "testing.md")) as f:
        readme = [line.strip() for line in f]
    first = table.splitlines()[0]
    assert first in readme, "docs/testing.md has no table headed " + first
    start = readme.index(first)
    end = next(i for i in range(start, len(readme)) if not readme[i].startswith("|"))
    assert "\n".join(readme[start:end]) + "\n" == table


def test_table_needs_every_variant(aot):
    with pytest.raises(EngineError, match="the table needs attention_fwd d40 in bfloat16"):
        markdown([r for r in aot[1] if r["dtype"] != "bfloat16" or r["head_dim"] != 40])


def test_ptxas_report_is_parsed_strictly():
    report = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
              "ptxas info    : Function properties for k\n"
              "    8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads\n"
              "ptxas info    : Used 255 registers, used 1 barriers\n")
    assert parse_ptxas(report, "k") == dict(registers=255, stack_bytes=8, spill_stores=12, spill_loads=4)
    for text, entry in ((report.replace("Used 255", "Used many"), "k"), (report, "other"),
                        ("ptxas info    : Used 40 registers\n", "k"), (report + report, "k")):
        with pytest.raises(EngineError, match=rf"ptxas -v report for {entry} does not match") as e:
            parse_ptxas(text, entry)
        assert repr(text)[:40] in str(e.value)


def test_aot_refuses_the_interpreter():
    res = subprocess.run([sys.executable, "-m", "ipadapter_instruct.kernels.aot", "--no-projector"], cwd=ROOT,
                         env={**ENV, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unset TRITON_INTERPRET" in res.stderr


def test_sdxl_launches_compile_without_spills(tmp_path):
    """`python -m ipadapter_instruct.kernels.aot --sdxl`: SDXL's launches at 1024 px (head dim 64 at 10 and 20 heads, the 1280-wide
    projector with both FF widths, GroupNorm+SiLU at 128x128, GEGLU at 2 x 2560) compile for sm_90 without spills."""
    out = tmp_path / "sdxl.json"
    res = subprocess.run([sys.executable, "-m", "ipadapter_instruct.kernels.aot", "--sdxl", "--arch", "90", "--dtype", "float16",
                          "--dtype", "bfloat16", "--json", str(out)], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())
    kernels = {(r["kernel"], r["dtype"]) for r in rows}
    for t in DTYPES:
        for k in (*ATTENTION, "projector_attention", "projector_ln_linear_gelu", *ELEMENTWISE):
            assert (k, t) in kernels, (k, t)
    assert ("packed_attention", "float16") in kernels
    assert {r["head_dim"] for r in rows if r["kernel"].startswith(("attention", "packed"))} == {64}
    for r in rows:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["registers"] <= 255, r
    # two levels x (forward + training forward + two backward) attention launches per dtype
    assert sum(r["kernel"].startswith("attention") and r["dtype"] == "float16" for r in rows) == 8


def test_sdxl_flag_refuses_the_sd15_table(capsys):
    from ipadapter_instruct.kernels.aot import main
    assert main(["--sdxl", "--markdown"]) == 2
    assert "--sdxl compiles SDXL's own launches" in capsys.readouterr().err
