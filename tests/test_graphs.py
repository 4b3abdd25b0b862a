"""The CUDA-graph path's static buffers: every request's values must reach the replayed step.

Capture needs a GPU; the same static-buffer path runs eagerly here (StaticUNet(capture=False)), which is
where a value captured by mistake (a request's K/V, scale or text rows) would show as a wrong image.
"""
import pytest
import torch

from conftest import NEGATIVE, PROMPT, gpu
from engine.errors import EngineError
from engine.graphs import StaticUNet


def test_static_buffers_carry_each_request(instruct_pipe, cond_image, other_image):
    base = dict(negative_prompt=NEGATIVE, num_inference_steps=3, output_type="latent")
    calls = [dict(prompt=PROMPT, image=cond_image, instruct="use the style", scale=0.8, seed=1),
             # same shape (2 rows), every per-request value different: the buffers must be refreshed
             dict(prompt="a blue boat", image=other_image, instruct="use the style of it", scale=0.3, seed=2),
             # 4 rows: a second entry
             dict(prompt=PROMPT, image=cond_image, instruct="use the composition", scale=0.6, seed=3)]
    eager = [instruct_pipe(**base, **c) for c in calls]
    assert not torch.equal(eager[0], eager[1])
    instruct_pipe._static = StaticUNet(instruct_pipe.unet, capture=False)
    try:
        static = [instruct_pipe(**base, **c) for c in calls]
        assert len(instruct_pipe._static.entries) == 2
        static.append(instruct_pipe(**base, **calls[0]))  # back to the first shape and request
    finally:
        instruct_pipe._static = None
    for got, want in zip(static, eager + eager[:1]):
        assert torch.equal(got, want)


def test_cuda_graphs_refuse_the_cpu(instruct_pipe):
    with pytest.raises(EngineError, match="CUDA graphs need a pipeline on cuda"):
        instruct_pipe.enable_cuda_graphs()


@gpu
def test_cuda_graph_replay_equals_eager_on_gpu(tiny, cond_image, other_image):
    from engine import Pipeline
    pipe = Pipeline.from_pretrained(tiny["model"], image_encoder=tiny["image_encoder"], adapter=tiny["adapter"],
                                    device="cuda", dtype="float16")
    pipe.set_progress_bar_config(disable=True)
    calls = [dict(prompt=PROMPT, image=cond_image, instruct="use the style", scale=0.8, seed=1),
             dict(prompt="a blue boat", image=other_image, instruct="use the style of it", scale=0.3, seed=2)]
    eager = [pipe(**c, num_inference_steps=4, output_type="latent") for c in calls]
    pipe.enable_cuda_graphs()
    graphed = [pipe(**c, num_inference_steps=4, output_type="latent") for c in calls]
    assert len(pipe._static.entries) == 1
    for got, want in zip(graphed, eager):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


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
