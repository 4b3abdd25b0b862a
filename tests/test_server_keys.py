"""The server's batching key (engine/server/runners.py PipelineRunner.key) in both batching modes: two requests that
differ in exactly one per-call setting arrive together and each gets the image it gets alone through the pipeline
(one grey level). Settings the pipeline takes once per call (ControlNet window and guess mode, SDXL's size
conditioning, scheduler, steps, size) keep the two apart; settings it takes per row (ControlNet scale, guidance mode,
a per-block adapter scale next to a number) let them share a call. Driven in-process: the batchers over the real
runner, both requests queued before the batcher's loop first runs."""
import asyncio
import time

import numpy as np
import pytest
from PIL import Image

from conftest import NEGATIVE, PROMPT, load_pipe
from ipadapter_instruct.engine.server.batcher import Batcher, Job
from ipadapter_instruct.engine.server.schemas import GenerateRequest
from ipadapter_instruct.engine.server.runners import PipelineRunner
from ipadapter_instruct.engine.server.stepper import StepBatcher

BATCHING = ["request", "step"]


def together(pipe, bodies, batching, image=None, control=None):
    """Both bodies queued at once (a long max_wait_ms: they would share a call if their keys were equal), then
    drained. -> (answers, jobs)."""
    runner = PipelineRunner(pipe)

    async def go():
        if batching == "step":
            batcher = StepBatcher(runner, max_batch_rows=64)
        else:
            batcher = Batcher(lambda jobs, progress: runner([j.payload for j in jobs], progress),
                              max_batch_rows=64, max_wait_ms=60_000)
        batcher.start()
        jobs = []
        for body in bodies:
            work = runner.prepare(GenerateRequest(**body), image, control)
            jobs.append(Job(work, runner.key(work), work.rows, time.monotonic() + 300))
        futures = [batcher.submit(job) for job in jobs]  # no await between: the loop sees both at once
        await batcher.drain()  # nothing more comes: the request batcher runs what it holds without waiting
        answers = await asyncio.gather(*futures)
        await batcher.stop()
        return answers, jobs
    return asyncio.run(go())


def check(pipe, bodies, batching, alone, shared, **inputs):
    answers, jobs = together(pipe, bodies, batching, **inputs)
    for i, (body, answer) in enumerate(zip(bodies, answers)):
        want = alone(body)
        assert len(answer["images"]) == 1 == len(want)
        assert answer["images"][0].size == want[0].size, f"request {i} ({body}) came back at another size"
        diff = np.abs(np.asarray(answer["images"][0], int) - np.asarray(want[0], int)).max()
        assert diff <= 1, f"request {i} ({body}) is {diff} grey levels off its image alone"
    if batching == "request":  # a per-row setting shares the call; a per-call one keeps the requests apart
        assert [j.batch_requests for j in jobs] == ([2, 2] if shared else [1, 1])


# ---- SD1.5 with IPAdapter-Instruct: scheduler, steps, size, guidance mode, a per-block scale -------------------

BASE = dict(prompt=PROMPT, negative_prompt=NEGATIVE, instruct="use the style of this image", scale=0.8,
            guidance_scale=6.0, instruct_guidance_scale=3.0, image_guidance_scale=1.5, num_inference_steps=2, seed=1)
SD15 = {  # setting: (the other value, shares a call)
    "scheduler": (dict(scheduler="euler_a"), False),
    "steps": (dict(num_inference_steps=3), False),
    "size": (dict(height=48), False),
    "guidance_mode": (dict(guidance_mode="full"), True),
    "per_block_scale": (dict(scale={"down": 0.8, "mid": 0.0, "up": 0.3}), True),
}


@pytest.mark.parametrize("batching", BATCHING)
@pytest.mark.parametrize("setting", list(SD15))
def test_sd15_settings(instruct_pipe, cond_image, setting, batching):
    other, shared = SD15[setting]
    first = dict(BASE, guidance_mode="simple") if setting == "guidance_mode" else BASE
    bodies = [first, dict(first, **other)]
    check(instruct_pipe, bodies, batching, lambda b: instruct_pipe(image=cond_image, **b), shared, image=cond_image)


# ---- ControlNet: guidance window, guess mode, conditioning scale ------------------------------------------------

@pytest.fixture(scope="module")
def control_pipe(tiny, tmp_path_factory):
    from test_controlnet import engine, make_controlnet
    return engine(tiny, make_controlnet(tiny, tmp_path_factory.mktemp("keys") / "net", 0))


@pytest.fixture(scope="module")
def control():
    return Image.fromarray((np.random.RandomState(1).rand(64, 64, 3) * 255).astype("uint8"))


CONTROL_BASE = dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=6.0, num_inference_steps=2, seed=1)
CONTROL = {
    "window_start": (dict(control_guidance_start=0.5), False),
    "window_end": (dict(control_guidance_end=0.5), False),
    "guess_mode": (dict(guess_mode=True), False),
    "conditioning_scale": (dict(controlnet_conditioning_scale=0.3), True),
}


@pytest.mark.parametrize("batching", BATCHING)
@pytest.mark.parametrize("setting", list(CONTROL))
def test_controlnet_settings(control_pipe, control, setting, batching):
    other, shared = CONTROL[setting]
    bodies = [CONTROL_BASE, dict(CONTROL_BASE, **other)]
    check(control_pipe, bodies, batching, lambda b: control_pipe(control_image=control, **b), shared, control=control)


# ---- SDXL: original_size, target_size, crops_coords_top_left -----------------------------------------------

@pytest.fixture(scope="module")
def sdxl_pipe(tmp_path_factory):
    from ipadapter_instruct.engine.tiny import make_tiny_sdxl
    sdxl = make_tiny_sdxl(str(tmp_path_factory.mktemp("keys-sdxl") / "tiny"))
    return load_pipe(sdxl, sdxl["adapter"])  # (from_pretrained opens an SDXL folder as SDXLPipeline)


SDXL_BASE = dict(prompt="a cat", negative_prompt="blurry, low quality", scale=0.7, guidance_scale=6.0,
                 num_inference_steps=2, seed=3)
SDXL = {
    "original_size": dict(original_size=[128, 96]),
    "target_size": dict(target_size=[48, 64]),
    "crops_coords_top_left": dict(crops_coords_top_left=[8, 4]),
}


@pytest.mark.parametrize("batching", BATCHING)
@pytest.mark.parametrize("setting", list(SDXL))
def test_sdxl_size_conditioning(sdxl_pipe, cond_image, setting, batching):
    bodies = [SDXL_BASE, dict(SDXL_BASE, **SDXL[setting])]

    def alone(body):
        return sdxl_pipe(image=cond_image, **{k: tuple(v) if isinstance(v, list) else v for k, v in body.items()})
    check(sdxl_pipe, bodies, batching, alone, False, image=cond_image)
