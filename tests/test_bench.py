"""`python -m bench` on the CPU: one run, every provider that can run here, rows in the agreed format."""
import gzip
import json

import pytest
import torch

from ipadapter_instruct.bench.__main__ import main
from ipadapter_instruct.bench.e2e_config import LADDER
from ipadapter_instruct.bench.ops import attention_work
from conftest import gpu

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
    latency = {(r["op"], r["provider"], r["x"]): r for r in rows if r["metric"] == "latency"}
    for r in rows:
        assert r["unit"] == {"latency": "ms", "throughput": "TFLOP/s", "bandwidth": "GB/s"}[r["metric"]]
        if r["metric"] == "latency":  # measured: ordered percentiles of real samples
            assert 0 < r["p20"] <= r["p50"] <= r["p80"], r
    for r in attention:  # derived rows: the work over the measured time (no kernel-only time on the CPU)
        if r["metric"] != "latency":
            c, t = r["config"], latency[(r["op"], r["provider"], r["x"])]
            assert c["timing"] == "latency"
            flops, bytes_ = attention_work(c["B"], c["Lq"], c["D"], 4)
            work = flops / 1e9 if r["metric"] == "throughput" else bytes_ / 1e6
            assert [r[k] for k in ("p20", "p50", "p80")] == pytest.approx([work / t[k] for k in ("p80", "p50", "p20")])
    projector = [r for r in rows if r["op"] == "projector" and r["metric"] == "throughput"]
    assert projector and projector[0]["config"]["branches"] == 4
    out = capsys.readouterr().out
    assert "not measured: fused:" in out and "two-sdpa" in out
    assert "not measured: kernel_latency: CUDA graphs need CUDA" in out


def test_sdxl_preset_has_the_published_sizes():
    """The sdxl preset's random models: SDXL base 1.0's UNet, VAE and two text encoders, ViT-H/14, and the
    IPAdapter-Instruct SDXL projector at the reference release's ResamplerInstructBigger size (built from the
    release's code: 189,849,344 parameters), all on the meta device."""
    import torch

    from ipadapter_instruct.bench.weights import sdxl_modules
    from ipadapter_instruct.engine.projector import InstructProjector, ProjectorConfig
    with torch.device("meta"):
        unet, vae, text, text2, vision = sdxl_modules()
        projector = InstructProjector(ProjectorConfig(dim=1280, depth=4, heads=20, num_queries=16, image_dim=1280,
                                                      output_dim=2048, ff_mult=4, text_dim=768))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(unet), count(vae), count(text), count(text2), count(vision), count(projector)) == (
        2_567_463_684, 83_653_863, 123_060_480, 694_659_840, 632_076_800, 189_849_344)
    assert unet.config.cross_attention_dim == text.config.hidden_size + text2.config.hidden_size == 2048


def test_e2e_runs_the_tiny_sdxl_preset(tmp_path, capsys):
    """`--preset tiny-sdxl`: the engine (IPAdapter-Instruct SDXL) against diffusers' StableDiffusionXLPipeline with
    IP-Adapter+ SDXL, in one run, with a FLOP count."""
    path = tmp_path / "e2e.json"
    assert main(["--preset", "tiny-sdxl", "--device", "cpu", "--batch", "1", "--steps", "2", "--repeats", "1",
                 "--providers", "engine,diffusers", "--cache", str(tmp_path / "w"), "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    latency = {r["provider"] for r in rows if r["metric"] == "latency"}
    assert latency == {"engine", "diffusers"} and all(r["config"]["preset"] == "tiny-sdxl" for r in rows)
    assert any(r["unit"] == "TFLOP/s" and r["p50"] > 0 for r in rows)
    assert "vs diffusers" in capsys.readouterr().out


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
            "stage:vae_decode", "stage:other", "throughput"} <= stages
    for (provider, b), r in latency.items():  # `other`: the last timed call less its named stages, never below 0
        other = next(x["p50"] for x in rows if (x["provider"], x["x"], x["metric"]) == (provider, b, "stage:other"))
        assert 0 <= other < max(r["config"]["p99"], r["p80"]), (provider, b, other)
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

    from ipadapter_instruct.bench.weights import sd15_modules
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
    """On the CPU the ladder is engine-eager and each CPU option alone on top of it (channels-last, bf16 where the CPU
    has bf16 instructions, the inductor's compile); the CUDA steps are not in it."""
    from ipadapter_instruct.bench.e2e_config import cpu_has_bf16

    rows = json.loads(path.read_text())
    timed = {r["provider"] for r in rows if r["metric"] == "latency"}
    assert timed == {"engine-eager", "+channels-last", "+compile"} | ({"+bf16"} if cpu_has_bf16() else set())
    out = capsys.readouterr().out
    if not cpu_has_bf16():
        assert "+bf16: skipped: this CPU has no bf16 instructions" in out
    assert "+fused-attention" not in out and "+cuda-graphs" not in out
    assert "vs eager" in out


# what each ladder step turns on: (the Triton attention in every cross-attention, the fused GEGLU, channels-last)
LADDER_STATE = {"engine-eager": (False, False, False), "+channels-last": (False, False, True),
                "+fused-attention": (True, False, True), "+fused-norms": (True, True, True),
                "+cuda-graphs": (True, True, True), "+compile": (True, True, True)}


def fast_path_state(pipe):
    from diffusers.models.activations import GEGLU

    backends = {p.backend for p in pipe.cross.values()}
    fused_geglu = any("forward" in m.__dict__ for m in pipe.unet.modules() if type(m) is GEGLU)
    conv = next(m for m in pipe.unet.modules() if isinstance(m, torch.nn.Conv2d))
    return (backends == {"triton"}, fused_geglu,
            conv.weight.is_contiguous(memory_format=torch.channels_last) and conv.weight.shape[-1] > 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter stands in for the GPU's Triton only on a "
                    "GPU-less machine (on a GPU the CPU pipeline built here falls back to sdpa)")
def test_ladder_steps_configure_one_piece_each(tmp_path):
    # built on the CPU (the interpreter stands in for the GPU's Triton): each step differs from the one
    # before by exactly its own piece
    from ipadapter_instruct.bench.e2e_config import E2EConfig
    from ipadapter_instruct.bench.e2e_providers import EngineProvider
    from ipadapter_instruct.bench.weights import bench_weights

    paths = bench_weights("tiny", str(tmp_path / "w"))
    for step in ("engine-eager", "+channels-last", "+fused-attention", "+fused-norms"):
        pipe = EngineProvider(step, paths, torch.device("cpu"), torch.float32, E2EConfig()).pipe
        assert fast_path_state(pipe) == LADDER_STATE[step], step


def test_cpu_ladder_steps_are_each_one_option_over_eager(tmp_path):
    from ipadapter_instruct.bench.e2e_config import E2EConfig
    from ipadapter_instruct.bench.e2e_providers import EngineProvider
    from ipadapter_instruct.bench.weights import bench_weights

    paths = bench_weights("tiny", str(tmp_path / "w"))
    got = {}
    for step in ("+channels-last", "+bf16", "+compile"):
        pipe = EngineProvider(step, paths, torch.device("cpu"), torch.float32, E2EConfig()).pipe
        got[step] = (fast_path_state(pipe)[2], pipe.dtype, pipe._compiled)
    assert got == {"+channels-last": (True, torch.float32, False), "+bf16": (False, torch.bfloat16, False),
                   "+compile": (False, torch.float32, True)}


@pytest.fixture(scope="module")
def ladder_on_gpu(tmp_path_factory):
    """Tiny weights, the ladder's config on CUDA in fp32 (no TF32), and engine-eager's latents to compare with."""
    from ipadapter_instruct.bench.e2e_config import E2EConfig
    from ipadapter_instruct.bench.e2e_providers import EngineProvider
    from ipadapter_instruct.bench.weights import bench_weights
    from ipadapter_instruct.engine.demo import draw_condition_image

    paths = bench_weights("tiny", str(tmp_path_factory.mktemp("ladder") / "w"))
    cfg = E2EConfig(device="cuda", dtype="float32", steps=3)
    image = draw_condition_image(64)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    eager = EngineProvider("engine-eager", paths, torch.device("cuda"), torch.float32, cfg)
    yield paths, cfg, image, eager(image, 2, output_type="latent").float()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


@gpu
@pytest.mark.parametrize("step", [s for s in LADDER if s != "engine-eager"])
def test_ladder_step_matches_eager_on_gpu(ladder_on_gpu, step):
    """On CUDA each ladder step turns on its pieces, and its latents (batch 2, 3 steps, fp32) match engine-eager's:
    relative L2 error under 1e-3 (fp32 kernels against fp32 PyTorch; a broken piece is off by O(1))."""
    from ipadapter_instruct.bench.e2e_providers import EngineProvider

    paths, cfg, image, eager = ladder_on_gpu
    provider = EngineProvider(step, paths, torch.device("cuda"), torch.float32, cfg)
    assert fast_path_state(provider.pipe) == LADDER_STATE[step]
    for call in range(2):  # the second call replays (CUDA graphs) or reuses the compiled UNet
        got = provider(image, 2, output_type="latent").float()
        assert got.shape == eager.shape and torch.isfinite(got).all()
        err = ((got - eager).norm() / eager.norm()).item()
        assert err < 1e-3, f"{step}, call {call + 1}: relative error {err:.3g} against engine-eager"


def test_e2e_report_says_when_full_guidance_is_unequal_work_and_keeps_peaks_per_batch():
    """The table's header names the unequal work of `--guidance-mode full` against diffusers' CFG, and each
    batch size keeps its own peak memory (the numbers here are made up; only the report is under test)."""
    from ipadapter_instruct.bench.e2e_config import E2EConfig
    from ipadapter_instruct.bench.e2e_report import report

    results = {(name, b): dict(times=[10.0 * b, 11.0 * b], stages={"unet_ms_per_step": 1.0}, peak_gib=peak)
               for name, b, peak in (("engine", 1, 1.5), ("engine", 4, 3.25), ("diffusers", 1, 2.0),
                                     ("diffusers", 4, 5.0))}
    env = dict(device="test", dtype="float16", git_sha="0")
    for mode, said in (("full", True), ("simple", False)):
        rows, text = report(E2EConfig(guidance_mode=mode, batches=(1, 4)), env, results, {}, [])
        assert ("unequal work" in text) == said
    peaks = {(r.provider, r.x): r.p50 for r in rows if r.metric == "peak_memory"}
    assert peaks == {("engine", 1): 1.5, ("engine", 4): 3.25, ("diffusers", 1): 2.0, ("diffusers", 4): 5.0}


@pytest.mark.parametrize("n", [1, 2, 3, 10, 37])
def test_percentiles_match_numpy(n):
    import numpy as np

    from ipadapter_instruct.bench.common import percentiles
    samples = list(np.random.default_rng(n).lognormal(size=n))
    qs = (0, 20, 50, 80, 90, 99, 100)
    assert percentiles(samples, qs) == pytest.approx(list(np.percentile(samples, qs)), rel=1e-12)


def test_kernel_only_time_has_its_own_rows_and_drives_the_throughput():
    """`kernel_latency` rows are the percentiles of what the kernel timer returned (a stand-in on the CPU: CUDA
    graphs need CUDA); throughput and bandwidth come from them, not from the launch-inclusive time."""
    import numpy as np

    from ipadapter_instruct.bench.ops import run_ops
    rng, given = np.random.default_rng(0), []

    def timer(fn):
        assert fn() is not None  # it times the provider's own call
        given.append(list(rng.uniform(0.01, 0.02, size=10)))
        return given[-1]

    rows, text = run_ops(torch.device("cpu"), torch.float32, [1], 1, ["two-sdpa"], kernel_timer=timer)
    kernel = [r for r in rows if r.metric == "kernel_latency"]
    assert len(kernel) == len(given) == 4 and all(r.unit == "ms" for r in kernel)  # one per attention shape
    for r, samples in zip(kernel, given):
        assert [r.p20, r.p50, r.p80] == pytest.approx(list(np.percentile(samples, [20, 50, 80])))
        flops, _ = attention_work(1, r.config["Lq"], r.config["D"], 4)
        tput = next(t for t in rows if t.metric == "throughput" and t.x == r.x)
        assert tput.config["timing"] == "kernel_latency" and tput.p50 == pytest.approx(flops / r.p50 / 1e9)
    assert f"{kernel[0].p50:.4f}" in text and "not measured: kernel_latency" not in text


def test_a_provider_with_wrong_output_gets_no_timing(monkeypatch):
    from ipadapter_instruct.bench import ops as bench_ops
    from ipadapter_instruct.kernels import decoupled_attention_ref
    monkeypatch.setattr(bench_ops, "decoupled_attention_sdpa", lambda *a: decoupled_attention_ref(*a) * 1.01)
    rows, text = bench_ops.run_ops(torch.device("cpu"), torch.float32, [1], 1, ["two-sdpa", "reference"])
    assert {r.provider for r in rows if r.op == "decoupled_attention"} == {"reference"}
    for lq, d in bench_ops.ATTENTION_SHAPES:
        assert f"not measured: two-sdpa B1 Lq{lq} D{d}: wrong output: max error" in text
    nan = torch.full((1, 2), float("nan"))
    assert bench_ops.wrong_output(nan, torch.zeros(1, 2), torch.zeros(1, 2)).startswith("wrong output")


def test_envcheck_names_every_package_the_gpu_check_needs(tmp_path):
    """`bash bench/gpu_session.sh envcheck` runs here: one line per needed package, present with the version this
    interpreter has or missing when it cannot import it; the interpreter's versions; --strict fails on a miss."""
    import importlib.metadata as md
    import importlib.util
    import os
    import subprocess
    import sys
    import tarfile

    from ipadapter_instruct.bench.envcheck import NEEDED, carried
    (tmp_path / "no-wheels").mkdir()
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "WHEELS": str(tmp_path / "no-wheels")}
    res = subprocess.run(["bash", "bench/gpu_session.sh", "envcheck"], capture_output=True, text=True, env=env,
                         timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = {ln.split(":")[1].strip().removeprefix("package "): ln for ln in res.stdout.splitlines()
             if ln.startswith("envcheck: package ")}
    assert set(lines) == set(NEEDED), res.stdout + res.stderr
    wheels = carried()
    for dist, (module, _) in NEEDED.items():
        if importlib.util.find_spec(module) is None:
            assert "missing" in lines[dist]
        else:
            assert f"present {md.version(dist) if dist != 'cupy' else ''}" in lines[dist]
        assert ("carried as a wheel" in lines[dist]) == (dist in wheels)
    assert f"envcheck: torch {torch.__version__}" in res.stdout and "envcheck: triton " in res.stdout
    missing = [d for d, (m, _) in NEEDED.items() if importlib.util.find_spec(m) is None]
    assert res.returncode == (1 if missing else 0)  # the second, --strict run
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as tar:  # $OUT keeps what was printed, in the logs
        saved = tar.extractfile("logs/envcheck.log").read().decode()
    assert all(lines[dist] in saved for dist in NEEDED)


def test_carried_wheels_bring_every_requirement_the_image_lacks():
    """Each carried wheel's requirements (as installed here, for Python 3.12 on Linux) are carried too or come
    with the GPU image: the list downloaded with --no-deps is a closed set."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    from ipadapter_instruct.bench.envcheck import IMAGE, carried, normalize
    wheels = carried()
    assert "diffusers" in wheels and not set(wheels) & IMAGE  # nothing the image has is carried
    env = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
    for name, line in wheels.items():
        assert md.version(name) == line.split("==")[1], f"{line}: this environment has {md.version(name)}"
        for req in map(Requirement, md.requires(name) or []):
            if req.marker is None or req.marker.evaluate(env):
                assert normalize(req.name) in wheels or normalize(req.name) in IMAGE, f"{name} needs {req}"


def test_gpu_check_turns_skips_of_gpu_tests_into_failures(tmp_path):
    """With ENGINE_GPU_CHECK=1 (the GPU check) a gpu-marked test that skips fails; other skips stay skips."""
    import os
    import subprocess
    import sys

    (tmp_path / "test_skips.py").write_text(
        "import pytest\n\n@pytest.mark.gpu\ndef test_marked():\n    pytest.skip('no compiler')\n\n"
        "def test_plain():\n    pytest.skip('not here')\n")
    tests = os.path.dirname(os.path.abspath(__file__))
    for check, expect in (("1", "1 skipped, 1 error"), ("0", "2 skipped")):
        env = {**os.environ, "ENGINE_GPU_CHECK": check, "PYTHONPATH": tests}
        res = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q",
                              "-rfEs", str(tmp_path / "test_skips.py")], capture_output=True, text=True, env=env,
                             timeout=120, cwd=tmp_path)
        assert expect in res.stdout, res.stdout + res.stderr
        assert ("which counts as a failure: Skipped: " in res.stdout) == (check == "1")  # with the skip's reason


def test_interleave_takes_the_providers_timed_calls_in_turn(monkeypatch):
    """--interleave: every provider loaded at once, warmed up, then their timed calls alternate (A, B, A, B, ...),
    each provider's stages and `other` from its own last call; without it, one provider's calls after the other's."""
    import numpy as np
    from PIL import Image

    from ipadapter_instruct.bench import e2e
    from ipadapter_instruct.bench.e2e_config import E2EConfig

    calls = []

    class Fake:
        def __init__(self, name):
            self.name, self.n = name, 0

        def __call__(self, image, batch):
            self.n += 1
            calls.append(self.name)
            return [Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8))] * batch

        def stages(self, wall_ms):
            return {"unet_ms_per_step": float(self.n), "other_ms": wall_ms}

    monkeypatch.setattr(e2e, "load_provider", lambda name, *a, **k: Fake(name))
    monkeypatch.setattr(e2e, "count_flops", lambda *a: 1.0)
    for interleave, want in ((True, ["a", "b"] * 4), (False, ["a"] * 4 + ["b"] * 4)):  # (a warm-up, 3 timed)
        calls.clear()
        cfg = E2EConfig(providers=("a", "b"), repeats=3, interleave=interleave)
        rows, text = e2e.run_e2e(cfg, {}, log=lambda *a: None)
        assert calls == want
        steps = {r.provider: r.p50 for r in rows if r.metric == "stage:unet_ms_per_step"}
        assert steps == {"a": 4.0, "b": 4.0}  # the stages of each provider's own last (fourth) call
        assert ("(interleaved)" in text) == interleave
