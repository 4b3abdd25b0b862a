"""The kernels compile for a real GPU (sm_90) on this machine, with Triton's own compiler and ptxas.

The interpreter accepts programs the GPU compiler rejects, so where no GPU is lent this is the check that
the code the engine launches on CUDA is legal. Runs `python -m kernels.aot` in a child process with
TRITON_INTERPRET unset (the session's kernels are interpreted ones).
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_attention_and_projector_kernels_compile_for_sm90(tmp_path):
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    res = subprocess.run([sys.executable, "-m", "kernels.aot", "--arch", "90", "--dtype", "float16",
                          "--head-dim", "40", "--json", str(out)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert {r["kernel"] for r in rows} == {
        "attention_fwd", "attention_bwd", "packed_attention", "projector_attention", "projector_ln_linear_gelu", "geglu",
        "groupnorm_silu_stats", "groupnorm_silu_stats_nhwc", "groupnorm_silu_apply", "groupnorm_silu_apply_nhwc"}
    for r in rows:
        assert r["arch"] == "sm_90" and r["cubin_bytes"] > 0 and 0 < r["registers"] <= 255, r
    packed = [r for r in rows if r["kernel"] == "packed_attention"]
    assert len(packed) == 1 and packed[0]["spill_stores"] == 0  # the plugin's kernel: fp16 d40 at sm_90


def test_aot_refuses_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-m", "kernels.aot", "--no-projector"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unset TRITON_INTERPRET" in res.stderr
