"""One pipeline, several threads: calls that overlap step by step (different prompts, images, adapter scales,
schedulers, step counts, sizes and guidance modes) each get what they get alone. The calls start together
(threading.Barrier) and a progress callback holds each one after its step s until every other running call has done
step s, so their preparations and steps interleave; nothing of one call may live on the pipeline where another
reads it (STYLE: a call's state travels with the call)."""
import threading

import numpy as np
import pytest
import torch
from conftest import NEGATIVE, PROMPT

WAIT_S = 60  # a lockstep wait that outlasts this is a hang, not slowness


class Lockstep:
    """Progress callbacks for n calls: after its step s, call i waits until each other call has done step s or
    ended. `log` records (call, step) in the order the steps finished."""

    def __init__(self, n: int):
        self.n, self.done, self.ended, self.log = n, [0] * n, [False] * n, []
        self.cond = threading.Condition()

    def callback(self, i: int):
        def after_step(step, total):
            with self.cond:
                self.done[i] = step
                self.log.append((i, step))
                self.cond.notify_all()
                others = [j for j in range(self.n) if j != i]
                if not self.cond.wait_for(lambda: all(self.ended[j] or self.done[j] >= step for j in others),
                                          timeout=WAIT_S):
                    raise TimeoutError(f"call {i} waited {WAIT_S} s after step {step}: {self.done}, {self.ended}")
        return after_step

    def end(self, i: int) -> None:
        with self.cond:
            self.ended[i] = True
            self.cond.notify_all()


def together(pipe, calls: list[dict]) -> list:
    """Run each call's keyword arguments on its own thread, all at once and in lockstep. -> outputs in order."""
    start, step = threading.Barrier(len(calls)), Lockstep(len(calls))
    out, errors = [None] * len(calls), [None] * len(calls)

    def run(i):
        try:
            start.wait(timeout=WAIT_S)
            out[i] = pipe(**calls[i], progress_callback=step.callback(i))
        except BaseException as e:  # noqa: BLE001 (re-raised in the test's thread below)
            errors[i] = e
        finally:
            step.end(i)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=4 * WAIT_S)
    assert not any(t.is_alive() for t in threads), "a call hung"
    for e in errors:
        if e is not None:
            raise e
    # the calls really overlapped: every call's first step finished before any call's last one
    firsts = [step.log.index((i, 1)) for i in range(len(calls))]
    lasts = [max(k for k, (j, _) in enumerate(step.log) if j == i) for i in range(len(calls))]
    assert max(firsts) < min(lasts), step.log
    return out


def calls(cond_image, other_image) -> list[dict]:
    """Calls that differ in everything a call sets: prompt, image, instruction, adapter scale (a number, a per-block
    dict, 0), scheduler (default PNDM; ancestral Euler, drawing noise each step, twice at different step counts; the
    multistep DPM++), steps, size, guidance mode (auto -> simple, full, none at guidance 1) and images per prompt."""
    return [
        dict(prompt=PROMPT, image=cond_image, instruct="use the style of this image", scale=0.8, seed=1,
             num_inference_steps=3),
        dict(prompt="a blue boat", image=other_image, instruct="take the object", negative_prompt=NEGATIVE,
             scale={"down": 0.4, "up": 1.1}, seed=2, num_inference_steps=4, scheduler="euler_a", guidance_mode="full",
             guidance_scale=4.0, instruct_guidance_scale=3.0, image_guidance_scale=1.5, num_images_per_prompt=2),
        dict(prompt="a tree", image=cond_image, instruct="take the object", scale=0.0, seed=3, num_inference_steps=2,
             scheduler="euler_a", guidance_scale=1.0, height=32, width=48),
        dict(prompt="a lamp", image=other_image, instruct="take the colour", scale=1.2, seed=4, num_inference_steps=3,
             scheduler="dpmpp_2m", guidance_scale=3.0, guidance_mode="simple"),
    ]


def test_two_threads_get_their_latents_alone(instruct_pipe, cond_image, other_image):
    a, b = calls(cond_image, other_image)[:2]
    alone = [instruct_pipe(**c, output_type="latent") for c in (a, b)]
    both = together(instruct_pipe, [dict(c, output_type="latent") for c in (a, b)])
    for got, want in zip(both, alone):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_four_threads_get_their_images_alone(instruct_pipe, cond_image, other_image):
    cs = calls(cond_image, other_image)
    alone = [instruct_pipe(**c) for c in cs]
    for got, want in zip(together(instruct_pipe, cs), alone):
        assert [im.size for im in got] == [im.size for im in want]
        for g, w in zip(got, want):
            diff = np.abs(np.asarray(g, dtype=np.int16) - np.asarray(w, dtype=np.int16))
            assert diff.max() <= 1, f"{diff.max()} grey levels off"


@pytest.fixture(scope="module")
def sdxl_pipe(tmp_path_factory):
    from conftest import load_pipe

    from ipadapter_instruct.engine.tiny import make_tiny_sdxl
    sdxl = make_tiny_sdxl(str(tmp_path_factory.mktemp("threads-sdxl") / "tiny"))
    return load_pipe(sdxl, sdxl["adapter"])  # (from_pretrained opens an SDXL folder as SDXLPipeline)


@pytest.fixture(scope="module")
def edit_pipe(tmp_path_factory):
    from ipadapter_instruct.engine import EditPipeline
    from ipadapter_instruct.engine.tiny import make_tiny
    tiny = make_tiny(str(tmp_path_factory.mktemp("threads-edit") / "tiny"), edit=True)
    pipe = EditPipeline.from_pretrained(tiny["model"], image_encoder=tiny["image_encoder"], adapter=tiny["adapter"],
                                        device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_alone(pipe, cs: list[dict]) -> None:
    alone = [pipe(**c, output_type="latent") for c in cs]
    for got, want in zip(together(pipe, [dict(c, output_type="latent") for c in cs]), alone):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def sdxl_calls(cond_image, other_image) -> list[dict]:
    """SDXL calls that differ in their size conditioning (a call's own, never the pipeline's) and everything else."""
    return [dict(prompt="a cat", image=cond_image, instruct="use the style", scale=0.7, seed=3, num_inference_steps=3,
                 original_size=(128, 96), crops_coords_top_left=(8, 4)),
            dict(prompt="a red boat", image=other_image, instruct="take the object", scale=0.3, seed=4,
                 num_inference_steps=2, guidance_scale=4.0, target_size=(48, 64), scheduler="euler_a")]


def test_sdxl_threads_keep_their_size_conditioning(sdxl_pipe, cond_image, other_image):
    assert_alone(sdxl_pipe, sdxl_calls(cond_image, other_image))


def test_sdxl_threads_through_a_shared_encoder_cache(sdxl_pipe, cond_image, other_image):
    """The server's conditioning cache, consulted by the pipeline itself: the pooled projections travel with the
    cached tokens, and nothing on the pipeline is replaced."""
    from ipadapter_instruct.engine.server.cache import ConditioningCache
    cs = sdxl_calls(cond_image, other_image)
    alone = [sdxl_pipe(**c, output_type="latent") for c in cs]
    cache = ConditioningCache(16)
    cache.attach(sdxl_pipe)
    try:
        assert "encode_text" not in vars(sdxl_pipe) and "encode_images" not in vars(sdxl_pipe)
        for _ in range(2):  # cold, then every text and image a hit
            got = together(sdxl_pipe, [dict(c, output_type="latent") for c in cs])
            for g, w in zip(got, alone):
                torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
        assert cache.hits["text"] > 0 and cache.hits["image"] > 0
    finally:
        sdxl_pipe.set_encoder_cache(None)


def test_edit_threads_keep_their_photos(edit_pipe, cond_image, other_image):
    photo = other_image.resize((48, 40))
    assert_alone(edit_pipe, [
        dict(prompt="make it winter", image=photo, adapter_image=cond_image, instruct="use the style", scale=0.6,
             seed=1, num_inference_steps=3),
        dict(prompt="add a hat", image=cond_image.resize((40, 56)), adapter_image=other_image, instruct="take it",
             scale=1.0, seed=2, num_inference_steps=2, guidance_scale=5.0, image_guidance_scale=2.0)])


def test_timings_are_each_threads_own(instruct_pipe, cond_image, other_image):
    """`pipe.timings` after a call is that call's: a thread reads its own, and another thread's calls never replace
    or add to it."""
    a, b = calls(cond_image, other_image)[:2]
    instruct_pipe(**dict(a, num_inference_steps=1))
    mine = dict(instruct_pipe.timings)
    seen = {}
    walls = {}

    def record(i):
        def after(step, total):
            if step == total:
                seen[i] = instruct_pipe.timings  # before this call ends: the thread's previous call's (none)
        return after

    def run(i, c):
        import time
        t0 = time.perf_counter()
        instruct_pipe(**c, progress_callback=record(i))
        walls[i] = ((time.perf_counter() - t0) * 1e3, dict(instruct_pipe.timings))

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate((a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=4 * WAIT_S)
    assert instruct_pipe.timings == mine
    assert seen == {0: {}, 1: {}}
    for i in range(2):
        wall, timings = walls[i]
        assert timings["total_ms"] <= wall
        assert 0 < timings["denoise_ms"] < timings["total_ms"]


def test_threads_through_one_set_of_static_buffers(instruct_pipe, cond_image, other_image):
    """The CUDA-graph path's static buffers (run eagerly here: capture needs CUDA) serve calls of one shape from
    several threads: each step copies its own call's inputs in and its output out, in turn."""
    from ipadapter_instruct.engine.cuda_graphs import StaticUNet
    from ipadapter_instruct.engine.selfcheck import SelfCheck
    a, b = calls(cond_image, other_image)[:2]
    same = dict(num_images_per_prompt=1, num_inference_steps=3, scheduler=None, guidance_mode="simple")
    cs = [dict(a, **same), dict(b, **same)]
    alone = [instruct_pipe(**c, output_type="latent") for c in cs]
    instruct_pipe._static = StaticUNet(instruct_pipe.unet, capture=False)
    # the first-use check off: it would catch a mixed-up step against the eager one and fall back, hiding it
    check, instruct_pipe.selfcheck = instruct_pipe.selfcheck, SelfCheck(enabled=False)
    try:
        got = together(instruct_pipe, [dict(c, output_type="latent") for c in cs])
        assert len(instruct_pipe._static.entries) == 1  # one shape: both calls through the same buffers
    finally:
        instruct_pipe._static, instruct_pipe.selfcheck = None, check
    for g, w in zip(got, alone):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
