"""The fast path checks itself (engine/selfcheck.py), tested by fault injection on the CPU: the Triton kernels run
under the interpreter, a CUDA-graph replay is the eager static-buffer path, a compiled UNet is dynamo's eager backend.

A kernel that raises and a kernel that returns wrong values each give the eager image, one warning and a report
naming the fallback; a replay that returns another graph's (stale) output is caught the same way; correct kernels
are kept (the image is the fused one, bit for bit). Shapes are tiny (32x32, one or two steps): the interpreter is slow.
"""
import logging

import pytest
import torch

from conftest import DEVICE, PROMPT, gpu

STYLE = "use the style of this image"
CALL = dict(num_inference_steps=1, seed=3, height=32, width=32, output_type="latent")
# kernel -> (where the pipeline looks it up at call time, its eager path)
KERNELS = {"decoupled_attention": None, "group_norm_silu": ("ipadapter_instruct.engine.fastpath.group_norm_silu",
                                                            "ipadapter_instruct.kernels.groupnorm_silu.group_norm_silu_ref"),
           "geglu": ("ipadapter_instruct.engine.fastpath.geglu", "ipadapter_instruct.kernels.geglu.geglu_ref"),
           "projector": ("ipadapter_instruct.kernels.projector.projector_forward", None)}


def pipeline(tiny, backend="triton", verify=True):
    from ipadapter_instruct.engine import Pipeline
    pipe = Pipeline.from_pretrained(tiny["model"], image_encoder=tiny["image_encoder"], adapter=tiny["adapter"],
                                    device="cpu", attention_backend=backend, verify_fast_path=verify)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def resolve(path):
    import importlib
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def raising(*args, **kwargs):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def wrong(kernel):
    """A kernel whose values are 1 % off (a dropped key block, a stale tile would be worse)."""
    return lambda *args, **kwargs: kernel(*args, **kwargs) * 1.01


def inject(monkeypatch, faults: dict) -> None:
    """faults: kernel -> "raise" | "wrong" | "eager" (its eager path in its place: what a fallback computes) |
    "eager-wrong" (the eager path 1 % off: a wrong kernel that costs no interpreter time)."""
    from ipadapter_instruct.engine import attention
    from ipadapter_instruct.kernels import decoupled_attention_sdpa

    for name, fault in faults.items():
        if name == "decoupled_attention":  # the processors' impl is chosen at construction: patch the registry
            real = attention.implementation("triton")
            fake = {"raise": raising, "wrong": wrong(real), "eager": decoupled_attention_sdpa,
                    "eager-wrong": wrong(decoupled_attention_sdpa)}[fault]
            monkeypatch.setattr(attention, "implementation",
                                lambda n, impl=attention.implementation: fake if n == "triton" else impl(n))
        elif name == "projector":
            real = resolve(KERNELS[name][0])
            eager = lambda module, *a: module(*a)  # noqa: E731  (the module's own forward)
            monkeypatch.setattr(KERNELS[name][0], {"raise": raising, "wrong": wrong(real), "eager": eager,
                                                   "eager-wrong": wrong(eager)}[fault])
        else:
            real = resolve(KERNELS[name][0])
            eager = lambda *a, ref=resolve(KERNELS[name][1]), **k: ref(*a, **k)  # noqa: E731
            monkeypatch.setattr(KERNELS[name][0], {"raise": raising, "wrong": wrong(real), "eager": eager,
                                                   "eager-wrong": wrong(eager)}[fault])


def fell_back(report) -> dict:
    return {v["component"]: v["reason"] for v in report["fell_back"]}


@pytest.mark.parametrize("faults", [
    {"decoupled_attention": "raise", "group_norm_silu": "raise", "geglu": "wrong", "projector": "wrong"},
    {"decoupled_attention": "wrong", "group_norm_silu": "wrong", "geglu": "raise", "projector": "raise"}],
    ids=["attention-norms-raise", "geglu-projector-raise"])
def test_faulty_kernels_fall_back_to_the_eager_image(tiny, cond_image, monkeypatch, caplog, faults):
    """Every fused kernel faulty at once (each fault kind on each kernel over the two cases): the call gives exactly
    the image of the same pipeline with each faulty kernel replaced by its eager path, one warning per component
    and shape names it, and the report lists each as fallen back with its error."""
    with monkeypatch.context() as m:
        inject(m, {k: "eager" for k in faults})
        want = pipeline(tiny, verify=False)(PROMPT, cond_image, STYLE, **CALL)
    inject(monkeypatch, faults)
    pipe = pipeline(tiny)
    with caplog.at_level(logging.WARNING, logger="ipadapter_instruct.engine.selfcheck"):
        got = pipe(PROMPT, cond_image, STYLE, **CALL)
    assert torch.equal(got, want)
    report = pipe.fast_path_report()
    reasons = fell_back(report)
    assert set(reasons) == set(faults), report
    for name, fault in faults.items():
        assert reasons[name].startswith("raised RuntimeError: CUDA error" if fault == "raise" else "max error"), \
            (name, reasons[name])
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == len(report["fell_back"]) and all("float32" in w for w in warned), warned
    assert any("decoupled_attention at q 2x" in w and "runs its eager path" in w for w in warned), warned
    again = pipe(PROMPT, cond_image, STYLE, **CALL)  # the verdicts hold: no new checks, the same image
    assert torch.equal(again, want) and len(pipe.fast_path_report()["checks"]) == len(report["checks"])


def test_correct_kernels_are_kept(tiny, cond_image, caplog):
    """The real kernels under the interpreter pass their checks: the image is the fused path's own, bit for bit,
    nothing falls back, and every fused component was checked once per shape (a second call checks nothing new)."""
    plain = pipeline(tiny, verify=False)
    want = plain(PROMPT, cond_image, STYLE, **CALL)
    pipe = pipeline(tiny)
    with caplog.at_level(logging.WARNING, logger="ipadapter_instruct.engine.selfcheck"):
        got = pipe(PROMPT, cond_image, STYLE, **CALL)
    assert torch.equal(got, want) and not caplog.records
    report = pipe.fast_path_report()
    assert report["fell_back"] == [] and report["unverified"] == [] and report["verify"], report
    assert {v["component"] for v in report["checks"]} == {"decoupled_attention", "group_norm_silu", "geglu",
                                                         "projector"}
    assert report["fused"]["decoupled_attention"] == ["triton"] and report["check_ms"] > 0
    assert all(v["error"] <= v["bound"] for v in report["checks"])
    assert plain.fast_path_report()["checks"] == []  # verify_fast_path=False checks nothing


def test_without_verification_a_faulty_kernel_reaches_the_image(tiny, cond_image, monkeypatch):
    """verify_fast_path=False really turns the checks off (so the tests above prove the check does the work)."""
    inject(monkeypatch, {"decoupled_attention": "eager-wrong", "group_norm_silu": "eager", "geglu": "eager",
                         "projector": "eager"})
    off = pipeline(tiny, verify=False)(PROMPT, cond_image, STYLE, **CALL)
    on = pipeline(tiny)(PROMPT, cond_image, STYLE, **CALL)
    assert (off - on).abs().max() > 1e-4


def stale_replays(monkeypatch):
    """Graph entries whose replay returns the output the first entry made last: a second graph (another key at
    the same shapes) hands back the first one's stale buffer."""
    from ipadapter_instruct.engine.cuda_graphs import StaticUNet

    build, last = StaticUNet._build, {}

    def stale_build(self, *args, **kwargs):
        e = build(self, *args, **kwargs)
        run, first = e.run, not last

        def replay():
            if first:
                last["out"] = run()
            return last["out"]
        e.run = replay
        return e
    monkeypatch.setattr(StaticUNet, "_build", stale_build)


def test_a_stale_replay_is_caught(tiny, cond_image, monkeypatch, caplog):
    """PNDM (integer timesteps) and Euler (float) get separate graph entries at the same shapes; the second
    entry's replay returns the first's output. Its first use is checked against the eager step: the call gives
    the eager latents and the report names cuda_graph."""
    from ipadapter_instruct.engine.cuda_graphs import StaticUNet

    pipe = pipeline(tiny, backend="sdpa")
    call = dict(image=cond_image, instruct=STYLE, num_inference_steps=2, seed=1, output_type="latent")
    want = [pipe(PROMPT, **call), pipe(PROMPT, **call, scheduler="euler")]
    stale_replays(monkeypatch)
    pipe._static = StaticUNet(pipe.unet, capture=False)  # the eager static-buffer path (capture needs CUDA)
    with caplog.at_level(logging.WARNING, logger="ipadapter_instruct.engine.selfcheck"):
        got = [pipe(PROMPT, **call), pipe(PROMPT, **call, scheduler="euler")]
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    report = pipe.fast_path_report()
    assert [v["component"] for v in report["fell_back"]] == ["cuda_graph"], report
    assert report["checked"] == 1 and report["fused"]["unet_step"] == "cuda_graph"
    assert "max error" in report["fell_back"][0]["reason"] and "rows 2" in report["fell_back"][0]["shape"]
    assert len(caplog.records) == 1 and "cuda_graph" in caplog.records[0].getMessage()


def test_without_the_check_the_stale_replay_reaches_the_latents(tiny, cond_image, monkeypatch):
    from ipadapter_instruct.engine.cuda_graphs import StaticUNet

    pipe = pipeline(tiny, backend="sdpa", verify=False)
    call = dict(image=cond_image, instruct=STYLE, num_inference_steps=2, seed=1, output_type="latent",
                scheduler="euler")
    want = pipe(PROMPT, **call)
    stale_replays(monkeypatch)
    pipe._static = StaticUNet(pipe.unet, capture=False)
    pipe(PROMPT, **{**call, "scheduler": None})
    assert not torch.allclose(pipe(PROMPT, **call), want, atol=1e-3)


def test_a_wrong_compiled_unet_falls_back(tiny, cond_image, monkeypatch):
    """A compiled UNet (dynamo's eager backend here) whose output is off: its first use at a shape is caught and
    that shape runs the uncompiled UNet; a correct one is kept."""
    pipe = pipeline(tiny, backend="sdpa")
    call = dict(image=cond_image, instruct=STYLE, num_inference_steps=2, seed=1, output_type="latent")
    want = pipe(PROMPT, **call)
    pipe.compile(backend="eager")
    assert torch.equal(pipe(PROMPT, **call), want) and pipe.fast_path_report()["checked"] == 1
    compiled = pipe.unet._compiled_call_impl
    monkeypatch.setattr(pipe.unet, "_compiled_call_impl",
                        lambda *a, **k: (compiled(*a, **k)[0] * 1.01,))
    got = pipe(PROMPT, **{**call, "height": 32})  # a new shape: checked, wrong, so the eager UNet serves it
    assert torch.equal(got, pipeline(tiny, backend="sdpa")(PROMPT, **{**call, "height": 32}))
    report = pipe.fast_path_report()
    assert [v["component"] for v in report["fell_back"]] == ["compiled_unet"], report


def test_server_reports_the_fast_path_on_ready_and_metrics(tiny, cond_image, monkeypatch, capsys):
    """The server's warm-up meets the stale replay: /ready's body and /metrics name the fallback, and the warm-up
    line says what the checks cost."""
    from ipadapter_instruct.engine.cuda_graphs import StaticUNet
    from ipadapter_instruct.engine.server.config import ServerConfig
    from server_utils import InProcessServer

    stale_replays(monkeypatch)
    pipe = pipeline(tiny, backend="sdpa")
    pipe._static = StaticUNet(pipe.unet, capture=False)
    pipe(PROMPT, cond_image, STYLE, num_inference_steps=1, seed=0, output_type="latent", scheduler="euler")
    srv = InProcessServer(ServerConfig(max_wait_ms=10), pipe)  # its warm-up (PNDM) is the second entry: stale
    try:
        body = srv.request("GET", "/ready").json()
        metrics = srv.request("GET", "/metrics").text
    finally:
        srv.close()
    assert [v["component"] for v in body["fast_path"]["fell_back"]] == ["cuda_graph"], body
    assert 'engine_fast_path_checks{component="cuda_graph",result="fallback"} 1.0' in metrics
    assert 'engine_fast_path_checks{component="cuda_graph",result="ok"} 1.0' in metrics
    assert "engine_fast_path_check_seconds" in metrics
    out = capsys.readouterr().out
    assert "warm-up: one 1-step request in" in out and "1 fell back to eager (cuda_graph at rows" in out, out


def test_compare_follows_the_kernels_rule():
    """The rule itself: within twice the eager path's own error plus ATOL x the reference's scale passes, beyond
    fails; NaN where the reference is finite fails; positions where the reference is not finite are left out."""
    from ipadapter_instruct.engine.selfcheck import ATOL, compare

    ref = torch.tensor([1.0, -2.0, 4.0, float("nan")])
    eager = ref + torch.tensor([1e-3, 0, 0, 0])
    bound = 2 * 1e-3 + ATOL[torch.float16] * 4
    assert compare(ref + 0.99 * bound, eager, ref, torch.float16)[0]
    ok, err, got_bound, why = compare(ref + 1.01 * bound, eager, ref, torch.float16)
    assert not ok and abs(got_bound - bound) < 1e-6 and why.startswith("max error")
    nan = ref.clone()
    nan[0] = float("nan")
    assert compare(nan, eager, ref, torch.float16)[3] == "non-finite values where the reference has none"
    assert not compare(ref[:2], eager, ref, torch.float16)[0]


@gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_real_fast_path_passes_its_own_checks_on_gpu(tiny, cond_image, dtype):
    """On a GPU, in half precision, with CUDA graphs: the fused kernels and the graph replays pass their first-use
    checks (a fallback here is a bug in a kernel or in the check's tolerance), and the check's cost is reported."""
    from pipelines import tiny_pipeline
    pipe = tiny_pipeline(tiny, DEVICE, dtype)
    pipe.enable_cuda_graphs()
    pipe(PROMPT, cond_image, STYLE, num_inference_steps=3, seed=1, output_type="latent")
    report = pipe.fast_path_report()
    assert report["fell_back"] == [] and report["unverified"] == [], report["fell_back"] + report["unverified"]
    assert {"decoupled_attention", "group_norm_silu", "geglu", "projector", "cuda_graph"} <= \
        {v["component"] for v in report["checks"]}
