"""`serve --batching step`: requests join the running UNet batch at the next step. Each answer equals its request
alone; a request arriving while another runs joins it mid-flight (and finishes first when it is shorter); a
request cancelled mid-flight leaves at the next step and the others are unchanged; a deadline drops a queued
request and never a running one (both batching modes, over HTTP too); a bad request fails alone; models the step
scheduler does not run are refused at start-up."""
import asyncio
import time

import numpy as np
import pytest
import torch

from conftest import NEGATIVE, PROMPT
from ipadapter_instruct.engine.server.batcher import DeadlineExceeded, Job
from ipadapter_instruct.engine.server.schemas import GenerateRequest
from ipadapter_instruct.engine.server.stepper import Cancelled, StepBatcher
from ipadapter_instruct.engine.server.runners import PipelineRunner

BODIES = [
    dict(prompt=PROMPT, instruct="use the style of this image", num_inference_steps=6, seed=1, scheduler="ddim"),
    dict(prompt="a blue boat", instruct="take the object", guidance_mode="full", num_inference_steps=3, seed=2,
         scheduler="euler_a", scale=0.5),
    dict(prompt="a cat", instruct="use everything from this image", num_inference_steps=4, seed=3, num_images=2,
         adapter_end=0.5),
]


def alone(pipe, image, body):
    b = dict(body)
    n = b.pop("num_images", 1)
    return pipe(image=image, negative_prompt=NEGATIVE, num_images_per_prompt=n, **b)


def same_images(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert np.abs(np.asarray(g, int) - np.asarray(w, int)).max() <= 1


def run_jobs(pipe, image, bodies, delays=None, deadlines=None, cancel_at=None, max_batch_rows=16, runner=None,
             join_at=None, photos=None):
    """Submit each body after its delay (s) to a StepBatcher over the real pipeline; cancel_at: {index: step} withdraws
    that job once its progress reaches the step; join_at: {index: (other, step)} submits that job when the other's
    progress reaches the step, the worker waiting until it is queued (so it joins at the next step, whatever the
    machine's speed); photos: per body, its init_image / mask_image. -> (outcomes: value or exception, jobs)."""
    import threading
    runner = runner or PipelineRunner(pipe)
    join_at = join_at or {}

    async def go():
        batcher = StepBatcher(runner, max_batch_rows=max_batch_rows)
        batcher.start()
        loop = asyncio.get_running_loop()
        jobs = []
        reached = {i: asyncio.Event() for i in join_at}
        queued = {i: threading.Event() for i in join_at}

        async def submit(i, body):
            await asyncio.sleep((delays or {}).get(i, 0.0))
            if i in join_at:
                await reached[i].wait()
            photo = (photos or {}).get(i, {})
            work = runner.prepare(GenerateRequest(negative_prompt=NEGATIVE, **body), image, **photo)

            def progress(step, total, i=i):
                if cancel_at and cancel_at.get(i) == step:
                    loop.call_soon_threadsafe(batcher.withdraw, jobs_by[i])
                for j, (other, at) in join_at.items():
                    if other == i and at == step:
                        loop.call_soon_threadsafe(reached[j].set)
                        queued[j].wait(60)
            deadline = time.monotonic() + (deadlines or {}).get(i, 300.0)
            job = Job(work, runner.key(work), work.rows, deadline, progress)
            jobs_by[i] = job
            jobs.append(job)
            fut = batcher.submit(job)
            if i in join_at:
                queued[i].set()
            try:
                return await fut
            except Exception as e:
                return e
        jobs_by = {}
        out = await asyncio.gather(*(submit(i, b) for i, b in enumerate(bodies)))
        await batcher.stop()
        return out, jobs_by
    return asyncio.run(go())


@pytest.fixture(scope="module")
def step_pipe(tiny):
    from conftest import load_pipe
    return load_pipe(tiny, tiny["adapter"])


def test_each_answer_equals_its_request_alone(step_pipe, cond_image):
    out, jobs = run_jobs(step_pipe, cond_image, BODIES)
    for body, value in zip(BODIES, out):
        assert not isinstance(value, BaseException), value
        same_images(value["images"], alone(step_pipe, cond_image, body))
    assert max(j.batch_requests for j in jobs.values()) == 3  # all three were in one step at some point


def test_a_short_request_joins_mid_flight_and_leaves_first(step_pipe, cond_image):
    # the short one joins at the long one's third step, whatever the machine's speed: on these random weights a
    # long DDIM run amplifies float rounding (1e-6 at its first step is 0.4 in the final latents), so the long
    # request stays short enough, and its join step fixed, for the one-grey-level comparison to hold
    long = dict(BODIES[0], num_inference_steps=10)
    short = dict(BODIES[1])
    out, jobs = run_jobs(step_pipe, cond_image, [long, short], join_at={1: (0, 2)})
    for i, body in enumerate((long, short)):
        same_images(out[i]["images"], alone(step_pipe, cond_image, body))
    # the short one started while the long one ran, shared its steps, and was answered before it
    assert jobs[1].started > jobs[0].started and jobs[1].batch_requests == 2
    assert jobs[1].future.result()["timings"]["compute_ms"] < jobs[0].future.result()["timings"]["compute_ms"]


def test_cancel_mid_flight_leaves_the_others_unchanged(step_pipe, cond_image):
    bodies = [dict(BODIES[0], num_inference_steps=12), BODIES[1]]
    out, jobs = run_jobs(step_pipe, cond_image, bodies, cancel_at={0: 3})
    assert isinstance(out[0], Cancelled)
    same_images(out[1]["images"], alone(step_pipe, cond_image, bodies[1]))


class HeldRunner(PipelineRunner):
    """Its first step waits `hold_s`: long enough for every deadline of the test to pass meanwhile."""

    def __init__(self, pipe, hold_s):
        super().__init__(pipe)
        self.hold_s, self.held = hold_s, False

    def step(self, flights, packer):
        if not self.held:
            self.held = True
            time.sleep(self.hold_s)
        return super().step(flights, packer)


def test_a_deadline_drops_a_queued_request_and_a_running_one_finishes(step_pipe, cond_image):
    # 2 rows each under a bound of 2: the second waits in the queue while the first runs; both deadlines pass
    # while the first is held in its first step
    bodies = [dict(BODIES[0], num_inference_steps=3), dict(BODIES[0], num_inference_steps=2, seed=7)]
    out, jobs = run_jobs(step_pipe, cond_image, bodies, delays={1: 0.05}, deadlines={0: 0.2, 1: 0.2},
                         max_batch_rows=2, runner=HeldRunner(step_pipe, 0.8))
    same_images(out[0]["images"], alone(step_pipe, cond_image, bodies[0]))
    assert isinstance(out[1], DeadlineExceeded) and "queued" in str(out[1]) and jobs[1].started is None


def test_a_bad_request_fails_alone(step_pipe, cond_image):
    bad = dict(BODIES[1], scheduler="lcm", num_inference_steps=60)  # over LCM's 50 original steps: fails at admission
    out, _ = run_jobs(step_pipe, cond_image, [BODIES[1], bad])
    assert isinstance(out[1], ValueError) and "original_steps" in str(out[1]), out[1]
    same_images(out[0]["images"], alone(step_pipe, cond_image, BODIES[1]))


def test_admission_is_bounded_and_oldest_first(step_pipe, cond_image):
    # 2 rows each (simple guidance); a bound of 4 rows: the third waits until one of the first two leaves
    bodies = [dict(BODIES[0], num_inference_steps=5), dict(BODIES[0], num_inference_steps=2, seed=7),
              dict(BODIES[0], num_inference_steps=2, seed=8)]
    out, jobs = run_jobs(step_pipe, cond_image, bodies, delays={1: 0.01, 2: 0.02}, max_batch_rows=4)
    assert all(not isinstance(v, BaseException) for v in out)
    assert max(j.batch_rows for j in jobs.values()) <= 4 and max(j.batch_requests for j in jobs.values()) == 2
    assert jobs[2].started > jobs[1].started > jobs[0].started


def test_http_server_in_step_mode(step_pipe, cond_image, tiny):
    from ipadapter_instruct.engine.server.config import ServerConfig
    from server_utils import InProcessServer, decode_png, png_base64

    server = InProcessServer(ServerConfig(batching="step"), step_pipe)
    try:
        bodies = [dict(b, negative_prompt=NEGATIVE, image=png_base64(cond_image)) for b in BODIES[:2]]
        answers = server.concurrently(*[("POST", "/v1/generate", {"json": b}) for b in bodies])
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        for body, answer in zip(BODIES, answers):
            same_images([decode_png(x) for x in answer.json()["images"]], alone(step_pipe, cond_image, body))
        text = server.request("GET", "/metrics").text
        assert "engine_step_rows_count" in text and "engine_step_requests_bucket" in text
    finally:
        server.close()


@pytest.mark.parametrize("batching", ["request", "step"])
def test_http_deadline_drops_queued_requests_only(step_pipe, cond_image, batching, monkeypatch):
    """One rule in both modes: a request still queued at --request-timeout-s gets 504 (dropped before compute); one
    running then finishes with 200. The first call is held until the queued request's 504 is in: by then both
    deadlines have passed."""
    import threading

    from ipadapter_instruct.engine.server.config import ServerConfig
    from server_utils import InProcessServer, png_base64

    server = InProcessServer(ServerConfig(batching=batching, max_batch_rows=2, max_wait_ms=0, request_timeout_s=0.5,
                                          warmup=False), step_pipe)
    entered, gate = threading.Event(), threading.Event()

    def held(fn):
        def call(*args, **kwargs):
            entered.set()
            gate.wait(60)
            return fn(*args, **kwargs)
        return call
    if batching == "step":
        monkeypatch.setattr(server.state.runner, "step", held(server.state.runner.step))
    else:
        monkeypatch.setattr(server.state.batcher, "run", held(server.state.batcher.run))
    body = dict(BODIES[0], negative_prompt=NEGATIVE, image=png_base64(cond_image), num_inference_steps=3)

    async def scenario():
        running = asyncio.ensure_future(server.client.post("/v1/generate", json=body))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        queued = await server.client.post("/v1/generate", json=dict(body, seed=9))
        gate.set()
        return await running, queued
    try:
        running, queued = server.call(scenario())
        assert queued.status_code == 504 and queued.json()["error"]["code"] == "deadline_exceeded", queued.text
        assert "before compute" in queued.json()["error"]["message"]
        assert running.status_code == 200, running.text
    finally:
        gate.set()
        server.close()


class CountingRunner(PipelineRunner):
    """Records each batched admission's size; `fail_many` makes batched admission fail (the one-by-one fallback)."""

    def __init__(self, pipe, fail_many=False):
        super().__init__(pipe)
        self.many, self.fail_many = [], fail_many

    def start_many(self, works, progress):
        self.many.append(len(works))
        if self.fail_many:
            raise RuntimeError("batched admission broke")
        return super().start_many(works, progress)


SAME_KEY = [dict(BODIES[0], num_inference_steps=3, seed=s, scale=sc, guidance_mode=m)
            for s, sc, m in ((31, 0.8, "simple"), (32, 0.4, "full"), (33, 1.0, "simple"))]


@pytest.mark.parametrize("fail_many", [False, True], ids=["batched", "fallback"])
def test_requests_of_one_key_are_admitted_together(step_pipe, cond_image, fail_many):
    runner = CountingRunner(step_pipe, fail_many)
    out, jobs = run_jobs(step_pipe, cond_image, SAME_KEY, runner=runner)
    assert runner.many == [3]  # the three arrived together: one batched admission (failed: each alone, below)
    for body, value in zip(SAME_KEY, out):
        assert not isinstance(value, BaseException), value
        same_images(value["images"], alone(step_pipe, cond_image, body))
    assert max(j.batch_requests for j in jobs.values()) == 3
