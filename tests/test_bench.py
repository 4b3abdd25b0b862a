"""`python -m bench ops` on the CPU: one run, every provider that can run here, rows in the agreed format."""
import json

from bench.__main__ import main

KEYS = {"op", "provider", "metric", "unit", "x_name", "x", "p20", "p50", "p80", "device", "dtype", "git_sha", "config"}


def test_ops_writes_rows_for_every_shape_and_provider(tmp_path, capsys):
    path = tmp_path / "ops.json"
    assert main(["ops", "--device", "cpu", "--batch", "1", "--repeats", "2", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert rows and all(set(r) == KEYS for r in rows)
    attention = [r for r in rows if r["op"] == "decoupled_attention"]
    shapes = {r["x"] for r in attention}
    assert shapes == {"B1 Lq4096 D40", "B1 Lq1024 D80", "B1 Lq256 D160", "B1 Lq64 D160"}
    assert {r["provider"] for r in attention} == {"two-sdpa", "reference"}
    for r in rows:
        assert r["p20"] <= r["p50"] <= r["p80"] and r["p20"] > 0, r
        assert r["unit"] == {"latency": "ms", "throughput": "TFLOP/s", "bandwidth": "GB/s"}[r["metric"]]
    projector = [r for r in rows if r["op"] == "projector" and r["metric"] == "throughput"]
    assert projector and projector[0]["config"]["branches"] == 4
    out = capsys.readouterr().out
    assert "not measured: fused:" in out and "two-sdpa" in out


def test_e2e_says_it_is_not_built(capsys):
    assert main([]) == 2
    assert "not built yet" in capsys.readouterr().err
