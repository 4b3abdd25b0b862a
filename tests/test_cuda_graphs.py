"""The CUDA-graph path's static buffers: every request's values must reach the replayed step.

Capture needs a GPU; the same static-buffer path runs eagerly here (StaticUNet(capture=False)), which is
where a value captured by mistake (a request's K/V, scale or text rows) would show as a wrong image.
"""
import pytest
import torch

from conftest import NEGATIVE, PROMPT, gpu
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.cuda_graphs import StaticUNet
from pipelines import check_within_rule, exact_fp32, tiny_pipeline


CALLS = [dict(prompt=PROMPT, image="cond", instruct="use the style", scale=0.8, seed=1),  # 2 rows: a first entry
         # the same request again: a replay of the same graph gives the same latents bit for bit
         dict(prompt=PROMPT, image="cond", instruct="use the style", scale=0.8, seed=1),
         # same shape (2 rows), every per-request value different: the buffers must be refreshed, no new capture
         dict(prompt="a blue boat", image="other", instruct="use the style of it", scale=0.3, seed=2),
         # 4 rows (full guidance): a second entry, one more capture
         dict(prompt=PROMPT, image="cond", instruct="use the composition", scale=0.6, seed=3),
         # back to the first shape and request
         dict(prompt=PROMPT, image="cond", instruct="use the style", scale=0.8, seed=1)]
ENTRIES_AFTER = [1, 1, 1, 2, 2]  # entries (and, on CUDA, graph captures) after each call


class Counts:
    """How often, during one call, a StaticUNet entry was built, a CUDA graph captured or replayed, and the
    UNet's forward itself ran (in a replayed step it does not: the graph's kernels run without Python)."""

    def __init__(self, monkeypatch, unet):
        self.builds = self.captures = self.replays = self.forwards = 0
        build, graph = StaticUNet._build, torch.cuda.graph

        def counted_build(static, *a, **kw):
            self.builds += 1
            return build(static, *a, **kw)

        def counted_graph(*a, **kw):
            self.captures += 1
            return graph(*a, **kw)
        monkeypatch.setattr(StaticUNet, "_build", counted_build)
        monkeypatch.setattr(torch.cuda, "graph", counted_graph)
        if torch.cuda.is_available():
            replay = torch.cuda.CUDAGraph.replay

            def counted_replay(g):
                self.replays += 1
                return replay(g)
            monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", counted_replay)
        self._hook = unet.register_forward_pre_hook(self._forward)

    def _forward(self, *_):
        self.forwards += 1

    def remove(self):
        self._hook.remove()

    def snapshot(self) -> dict:
        return dict(builds=self.builds, captures=self.captures, replays=self.replays, forwards=self.forwards)


def run_calls(pipe, calls, images, counts=None):
    """Each call's latents (4 steps) and, with counts, what that call built, captured, replayed and ran."""
    out, seen = [], []
    for c in calls:
        before = counts.snapshot() if counts else {}
        out.append(pipe(**{**c, "image": images[c["image"]]}, negative_prompt=NEGATIVE, num_inference_steps=4,
                        output_type="latent"))
        seen.append({k: v - before[k] for k, v in counts.snapshot().items()} if counts else {})
    return out, seen


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
def test_static_entries_capture_once_per_shape_and_replay(device, instruct_pipe, tiny, cond_image, other_image,
                                                          monkeypatch):
    """Captures are counted where they happen (StaticUNet._build, torch.cuda.graph), replays where they happen
    (CUDAGraph.replay), and the UNet's own forward on the side: on the CPU the static-buffer path runs eagerly
    (StaticUNet(capture=False)) and must equal the plain path bit for bit; on CUDA every step of every call
    is a replay, a repeated request is bitwise the same, and each equals the eager path by the kernels' rule
    (its error against an fp32 eager run at most twice the fp16 eager run's, plus 1e-3 x the latents' size)."""
    images = {"cond": cond_image, "other": other_image}
    pipe = instruct_pipe if device == "cpu" else tiny_pipeline(tiny, "cuda", "float16")
    counts = Counts(monkeypatch, pipe.unet)
    capture = device == "cuda"
    pipe.selfcheck.forget("cuda_graph")  # (a session pipeline: no verdict from another test)
    # a new entry's first step is checked against the eager step (and, below fp32, an fp32 one): engine/selfcheck.py
    check = 1 if pipe.dtype == torch.float32 else 2
    try:
        eager, eager_seen = run_calls(pipe, CALLS, images, counts)
        if capture:
            pipe.enable_cuda_graphs()
        else:
            pipe._static = StaticUNet(pipe.unet, capture=False)
        graphed, seen = run_calls(pipe, CALLS, images, counts)
        entries, warmup_and_capture = len(pipe._static.entries), pipe._static.warmup + 1
    finally:
        pipe._static = None
        counts.remove()
    steps = [s["forwards"] for s in eager_seen]  # UNet evaluations per call (the scheduler's, not always 4)
    assert entries == ENTRIES_AFTER[-1]
    new_entries = [b - a for a, b in zip([0] + ENTRIES_AFTER, ENTRIES_AFTER)]
    for i, (s, new, n) in enumerate(zip(seen, new_entries, steps)):
        assert s["builds"] == new and s["captures"] == (new if capture else 0), (i, s)
        if capture:  # the UNet runs only to warm up and capture a new entry; every step is a replay
            assert s["replays"] == n and s["forwards"] == new * (warmup_and_capture + check), (i, s)
        else:
            assert s["replays"] == 0 and s["forwards"] == n + new * check, (i, s)
    assert torch.equal(graphed[1], graphed[0]) and torch.equal(graphed[4], graphed[0])
    assert not torch.allclose(graphed[2], graphed[0], atol=1e-3)  # the second request's values reached the step
    if not capture:
        for i, (got, want) in enumerate(zip(graphed, eager)):
            assert torch.equal(got, want), i
        return
    exact_fp32(monkeypatch)
    exact_pipe = tiny_pipeline(tiny, "cuda", "float32", "reference")
    exact, _ = run_calls(exact_pipe, CALLS, images)
    for i, (got, plain, ref) in enumerate(zip(graphed, eager, exact)):
        check_within_rule(got, plain, ref, f"call {i} graphed")


def test_cuda_graphs_refuse_the_cpu(instruct_pipe):
    with pytest.raises(EngineError, match="CUDA graphs need a pipeline on cuda"):
        instruct_pipe.enable_cuda_graphs()


def test_static_buffers_follow_the_timestep_dtype(instruct_pipe, cond_image):
    """PNDM's timesteps are int64, Euler's fractional floats: at the same shape each gets its own entry, so a
    float timestep is never copied into (and truncated by) an integer buffer."""
    call = dict(prompt=PROMPT, image=cond_image, instruct="use the style", num_inference_steps=3, seed=1,
                output_type="latent")
    eager = [instruct_pipe(**call), instruct_pipe(**call, scheduler="euler")]
    instruct_pipe._static = StaticUNet(instruct_pipe.unet, capture=False)
    try:
        static = [instruct_pipe(**call), instruct_pipe(**call, scheduler="euler")]
        assert len(instruct_pipe._static.entries) == 2
    finally:
        instruct_pipe._static = None
    for got, want in zip(static, eager):
        assert torch.equal(got, want)
