"""`python -m bench` on the CPU: one run, every provider that can run here, rows in the agreed format."""
import gzip
import json

import pytest
import torch

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
    assert {r["provider"] for r in attention} - {"xformers"} == {"two-sdpa", "reference"}  # xformers if installed
    for r in rows:
        assert r["p20"] <= r["p50"] <= r["p80"] and r["p20"] > 0, r
        assert r["unit"] == {"latency": "ms", "throughput": "TFLOP/s", "bandwidth": "GB/s"}[r["metric"]]
    projector = [r for r in rows if r["op"] == "projector" and r["metric"] == "throughput"]
    assert projector and projector[0]["config"]["branches"] == 4
    out = capsys.readouterr().out
    assert "not measured: fused:" in out and "two-sdpa" in out


def test_e2e_compares_the_providers_in_one_run(tmp_path, capsys):
    path, plot = tmp_path / "e2e.json", tmp_path / "e2e.png"
    # no subcommand: `python -m bench [options]` is the end-to-end benchmark
    assert main(["--device", "cpu", "--batch", "1,2", "--steps", "2", "--repeats", "2", "--cache", str(tmp_path / "w"),
                 "--json", str(path), "--plot", str(plot), "--profile", str(tmp_path / "prof")]) == 0
    rows = json.loads(path.read_text())
    assert all(set(r) == KEYS for r in rows)
    latency = {(r["provider"], r["x"]): r for r in rows if r["metric"] == "latency"}
    assert set(latency) == {(p, b) for p in ("engine", "engine-eager", "diffusers") for b in (1, 2)}
    for r in latency.values():
        assert r["unit"] == "ms" and 0 < r["p20"] <= r["p50"] <= r["p80"] <= r["config"]["p99"]
    stages = {r["metric"] for r in rows if r["provider"] == "engine" and r["x"] == 1}
    assert {"stage:text_encoder", "stage:image_encoder", "stage:projector", "stage:unet_ms_per_step",
            "stage:vae_decode", "throughput"} <= stages
    assert any(r["unit"] == "TFLOP/s" and r["p50"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "vs diffusers" in out and "warm-up" in out
    assert plot.stat().st_size > 10_000
    # --profile: the stage counts come from the profiler's ranges. The engine's step-invariant work runs once per
    # call, diffusers' projector in every UNet call; both run the UNet once per timestep
    calls = {(r["provider"], r["x"], r["metric"].removeprefix("calls:")): r["p50"] for r in rows
             if r["metric"].startswith("calls:")}
    for b in (1, 2):
        steps = calls[("engine", b, "unet_step")]
        assert steps >= 2 and calls[("diffusers", b, "unet_step")] == steps
        for stage in ("text_encoder", "image_encoder", "projector", "kv", "vae_decode"):
            assert calls[("engine", b, stage)] == 1, stage
        assert calls[("diffusers", b, "projector")] == steps
        for provider in ("engine", "engine-eager", "diffusers"):
            trace = json.loads(gzip.decompress((tmp_path / "prof" / f"{provider}-batch{b}.json.gz").read_bytes()))
            assert any(e.get("name") == f"{provider.split('-')[0]}::unet_step" for e in trace["traceEvents"])
            assert "Self CPU" in (tmp_path / "prof" / f"{provider}-batch{b}.txt").read_text()
    assert "engine: profiled batch 1: text_encoder x1, image_encoder x1, projector x1, kv x1" in out


def test_e2e_rejects_bad_options(capsys):
    assert main(["e2e", "--providers", "engine,comfy"]) == 2
    assert "unknown provider(s) comfy" in capsys.readouterr().err
    assert main(["e2e", "--model", "x"]) == 2
    assert "give all of --model" in capsys.readouterr().err
    assert main(["ops", "--providers", "two-sdpa,flash"]) == 2
    assert "unknown provider(s) flash" in capsys.readouterr().err


def test_sd15_preset_has_the_published_sizes():
    """The sd15 preset's random models are SD1.5's and ViT-H/14's shapes (parameter counts of the public
    checkpoints), built on the meta device so nothing is allocated."""
    import torch

    from bench.weights import sd15_modules
    with torch.device("meta"):
        unet, vae, text, vision = sd15_modules()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(unet), count(vae), count(text), count(vision)) == (859_520_964, 83_653_863, 123_060_480,
                                                                     632_076_800)
    assert unet.config.cross_attention_dim == 768 and vision.config.hidden_size == 1280


def test_ladder_runs_what_the_cpu_can_and_names_the_rest(tmp_path, capsys):
    path = tmp_path / "ladder.json"
    assert main(["--ladder", "--device", "cpu", "--steps", "1", "--repeats", "1", "--cache", str(tmp_path / "w"),
                 "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert {r["provider"] for r in rows if r["metric"] == "latency"} == {"engine-eager", "+channels-last"}
    out = capsys.readouterr().out
    for step in ("+fused-attention", "+fused-norms", "+cuda-graphs", "+compile"):
        assert f"{step}: skipped: the fused kernels need CUDA" in out
    assert "vs eager" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter stands in for the GPU's Triton only on a "
                    "GPU-less machine (on a GPU the CPU pipeline built here falls back to sdpa)")
def test_ladder_steps_configure_one_piece_each(tmp_path):
    # built on the CPU (the interpreter stands in for the GPU's Triton): each step differs from the one
    # before by exactly its own piece
    import torch
    from diffusers.models.activations import GEGLU

    from bench.e2e import E2EConfig, EngineProvider
    from bench.weights import bench_weights
    from kernels.backends import implementation

    paths = bench_weights("tiny", str(tmp_path / "w"))
    cpu, cfg = torch.device("cpu"), E2EConfig()

    def state(name):
        pipe = EngineProvider(name, paths, cpu, torch.float32, cfg).pipe
        impls = {p.impl for p in pipe.cross.values()}
        fused_geglu = any("forward" in m.__dict__ for m in pipe.unet.modules() if type(m) is GEGLU)
        conv = next(m for m in pipe.unet.modules() if isinstance(m, torch.nn.Conv2d))
        return (impls == {implementation("triton")}, fused_geglu,
                conv.weight.is_contiguous(memory_format=torch.channels_last) and conv.weight.shape[-1] > 1)

    assert state("engine-eager") == (False, False, False)
    assert state("+channels-last") == (False, False, True)
    assert state("+fused-attention") == (True, False, True)
    assert state("+fused-norms") == (True, True, True)


def test_e2e_report_says_when_full_guidance_is_unequal_work_and_keeps_peaks_per_batch():
    """The table's header names the unequal work of `--guidance-mode full` against diffusers' CFG, and each
    batch size keeps its own peak memory (the numbers here are made up; only the report is under test)."""
    from bench.e2e import E2EConfig, _report

    results = {(name, b): dict(times=[10.0 * b, 11.0 * b], stages={"unet_ms_per_step": 1.0}, peak_gib=peak)
               for name, b, peak in (("engine", 1, 1.5), ("engine", 4, 3.25), ("diffusers", 1, 2.0),
                                     ("diffusers", 4, 5.0))}
    env = dict(device="test", dtype="float16", git_sha="0")
    for mode, said in (("full", True), ("simple", False)):
        rows, text = _report(E2EConfig(guidance_mode=mode, batches=(1, 4)), env, results, {}, [])
        assert ("unequal work" in text) == said
    peaks = {(r.provider, r.x): r.p50 for r in rows if r.metric == "peak_memory"}
    assert peaks == {("engine", 1): 1.5, ("engine", 4): 3.25, ("diffusers", 1): 2.0, ("diffusers", 4): 5.0}
