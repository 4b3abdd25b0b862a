"""Step-level batching (engine/stepping.py): a request's latents are the same whether it runs alone or joins, mid-
flight, a running set of other requests with other step counts, schedulers (an ancestral one with its own
generator among them), guidance modes, scales and adapter step ranges, and whether others join or leave during its
steps; the same through the CUDA-graph static buffers (eager here) with rows padded to a bucket."""
import pytest
import torch

from conftest import NEGATIVE, PROMPT, fly
from ipadapter_instruct.engine.errors import EngineError

REQUESTS = [
    dict(prompt=PROMPT, instruct="use the style of this image", num_inference_steps=6, scheduler="ddim", seed=1,
         scale=0.8),
    dict(prompt="a blue boat", instruct="take the object", guidance_mode="full", num_inference_steps=4,
         scheduler="euler_a", seed=2, scale=0.5, num_images_per_prompt=2),
    dict(prompt="a cat", instruct="use everything from this image", num_inference_steps=5, scheduler="dpmpp_2m",
         seed=3, scale=1.0, guidance_scale=4.0, adapter_end=0.5),
    dict(prompt="a tree", instruct="copy the face from this image", num_inference_steps=3, seed=4, scale=0.6,
         guidance_scale=1.0),
]


def alone(pipe, image, r):
    return pipe(image=image, negative_prompt=NEGATIVE, output_type="latent", **r)


def flight(pipe, image, r):
    return pipe.start(image=image, negative_prompt=NEGATIVE, output_type="latent", **r)


def run_schedule(pipe, image, joins: dict, leave: dict | None = None):
    """REQUESTS on conftest.fly's schedule. -> {index: latents} of those that finished."""
    return fly(pipe, [dict(r, image=image, negative_prompt=NEGATIVE, output_type="latent") for r in REQUESTS],
               joins, leave)


@pytest.fixture(scope="module")
def wants(instruct_pipe, cond_image):
    return [alone(instruct_pipe, cond_image, r) for r in REQUESTS]


def test_one_flight_equals_the_call(instruct_pipe, cond_image, wants):
    got = run_schedule(instruct_pipe, cond_image, {0: [0]})
    torch.testing.assert_close(got[0], wants[0], atol=1e-5, rtol=1e-5)


def test_joining_mid_flight_equals_alone(instruct_pipe, cond_image, wants):
    # 0 starts alone, 1 joins at its third step, 2 and 3 later; 3 finishes first, 1 leaves while 0 and 2 run
    got = run_schedule(instruct_pipe, cond_image, {0: [0], 2: [1], 3: [2, 3]})
    assert sorted(got) == [0, 1, 2, 3]
    for i, want in enumerate(wants):
        torch.testing.assert_close(got[i], want, atol=1e-4, rtol=1e-4, msg=lambda m, i=i: f"request {i}: {m}")


def test_a_request_leaving_changes_nothing_else(instruct_pipe, cond_image, wants):
    got = run_schedule(instruct_pipe, cond_image, {0: [0, 1, 2]}, leave={1: 2})
    assert sorted(got) == [0, 2]
    for i in (0, 2):
        torch.testing.assert_close(got[i], wants[i], atol=1e-4, rtol=1e-4)


def test_static_buffers_with_padded_rows(instruct_pipe, cond_image, wants):
    from ipadapter_instruct.engine.cuda_graphs import StaticUNet
    instruct_pipe._static = StaticUNet(instruct_pipe.unet, capture=False)
    try:
        got = run_schedule(instruct_pipe, cond_image, {0: [0], 1: [3], 2: [1]})
        shapes = {k[0][0] for k in instruct_pipe._static.entries}
    finally:
        instruct_pipe._static = None
    for i in (0, 1, 3):
        torch.testing.assert_close(got[i], wants[i], atol=1e-4, rtol=1e-4)
    assert shapes <= {1, 2, 4, 8, 16} and len(shapes) > 1  # padded to buckets, more than one bucket seen


def test_images_from_a_flight(instruct_pipe, cond_image):
    f = instruct_pipe.start(image=cond_image, prompt=PROMPT, instruct="use the style of this image",
                            num_inference_steps=2, seed=5)
    seen = []
    f.progress = lambda step, total: seen.append((step, total))
    while not f.done:
        instruct_pipe.step([f])
    images = instruct_pipe.finish(f)
    want = instruct_pipe(PROMPT, cond_image, "use the style of this image", num_inference_steps=2, seed=5)
    assert seen == [(k, f.total) for k in range(1, f.total + 1)] and len(images) == 1
    import numpy as np
    assert np.abs(np.asarray(images[0], int) - np.asarray(want[0], int)).max() <= 1


def test_bad_flights(instruct_pipe, cond_image):
    with pytest.raises(EngineError, match="a flight is one request"):
        instruct_pipe.start(image=cond_image, prompt=[PROMPT, PROMPT], instruct="use the style of this image")
    with pytest.raises(EngineError, match="unknown argument"):
        instruct_pipe.start(image=cond_image, instruct="x", promt="typo")
    a = flight(instruct_pipe, cond_image, dict(REQUESTS[3], height=64))
    b = flight(instruct_pipe, cond_image, dict(REQUESTS[3], height=32))
    with pytest.raises(EngineError, match="share an image size"):
        instruct_pipe.step([a, b])
    with pytest.raises(EngineError, match="not finished"):
        instruct_pipe.finish(a)


def half_mask():
    from PIL import Image
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (0, 0, 32, 64))
    return m


# one step count and scheduler (what start_many batches), everything else per request: guidance modes, scales,
# seeds through an ancestral scheduler, a step range and a regional mask
TOGETHER = [
    dict(prompt=PROMPT, instruct="use the style of this image", seed=11, scale=0.8),
    dict(prompt="a blue boat", instruct="take the object", guidance_mode="full", seed=12, scale=0.5),
    dict(prompt="a cat", instruct="use everything from this image", seed=13, scale=1.0, guidance_scale=4.0,
         adapter_end=0.5, adapter_masks=half_mask()),
]
SHARED = dict(num_inference_steps=4, scheduler="euler_a", height=64, width=64)


def test_admitted_together_equals_alone(instruct_pipe, cond_image):
    wants = [alone(instruct_pipe, cond_image, dict(r, **SHARED)) for r in TOGETHER]
    import inspect
    defaults = {k: p.default for k, p in inspect.signature(type(instruct_pipe).__call__).parameters.items()}
    lists = {k: [r.get(k, defaults[k]) for r in TOGETHER] for k in sorted({k for r in TOGETHER for k in r})}
    flights = instruct_pipe.start_many(image=[cond_image] * 3, negative_prompt=NEGATIVE, output_type="latent",
                                       **lists, **SHARED)
    assert [f.rows for f in flights] == [2, 4, 2]
    late = flight(instruct_pipe, cond_image, REQUESTS[3])  # one admitted alone joins the three at their second step
    running = [flights[0], flights[1], flights[2]]
    instruct_pipe.step(running)
    running.append(late)
    while running:
        instruct_pipe.step(running)
        running = [f for f in running if not f.done]
    for i, (f, want) in enumerate(zip(flights, wants)):
        torch.testing.assert_close(instruct_pipe.finish(f), want, atol=1e-4, rtol=1e-4,
                                   msg=lambda m, i=i: f"request {i}: {m}")
    want_late = alone(instruct_pipe, cond_image, REQUESTS[3])
    torch.testing.assert_close(instruct_pipe.finish(late), want_late, atol=1e-4, rtol=1e-4)


def test_finish_many_decodes_each_flight_as_alone(instruct_pipe, cond_image):
    import numpy as np
    reqs = [dict(prompt=PROMPT, seed=21, num_inference_steps=2), dict(prompt="a cat", seed=22, num_inference_steps=3)]
    flights = [instruct_pipe.start(image=cond_image, instruct="use the style of this image", **r) for r in reqs]
    while any(not f.done for f in flights):
        instruct_pipe.step([f for f in flights if not f.done])
    got = instruct_pipe.finish_many(flights)
    for r, images in zip(reqs, got):
        want = instruct_pipe(image=cond_image, instruct="use the style of this image", **r)
        assert len(images) == 1
        assert np.abs(np.asarray(images[0], int) - np.asarray(want[0], int)).max() <= 1
    with pytest.raises(EngineError, match="not finished"):
        instruct_pipe.finish_many([instruct_pipe.start(image=cond_image, instruct="x", prompt=PROMPT)])
