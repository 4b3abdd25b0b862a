"""InstructPix2Pix (engine.EditPipeline, `python -m engine edit`) against diffusers' own
StableDiffusionInstructPix2PixPipeline on the same tiny random IP2P weights (`make_tiny(DIR, edit=True)`): latents
and PNGs for the same seed with four schedulers, two images per prompt, odd photo sizes, an IP-Adapter+ image;
the guidance invariants; requests batched together equal each alone; adapter scale 0 equals plain IP2P; and the
one-line errors."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DEVICE, fly
from ipadapter_instruct.engine.errors import EngineError

pytestmark = pytest.mark.filterwarnings("ignore:You have passed 2 text prompts")  # diffusers' own, num_images 2
STEPS = 4
EDIT = "make it look like winter"
# a batch against each request alone, in latents at euler_a's sigmas: convolutions of different batch sizes round
# differently, most on AVX2 CPUs (AMD EPYC: up to 1.6e-4 on a few elements); still far below one grey level
BATCH_TOL = 3e-4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def photo():
    g = np.random.RandomState(0)
    return Image.fromarray((g.rand(70, 54, 3) * 255).astype("uint8"))  # odd size: rounds down to 68 x 52


@pytest.fixture(scope="module")
def edit_pipe(tiny_edit):
    from ipadapter_instruct.engine import EditPipeline
    pipe = EditPipeline.from_pretrained(tiny_edit["model"], device="cpu", dtype="float32")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def d_edit(tiny_edit):
    from diffusers import StableDiffusionInstructPix2PixPipeline
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_edit["model"], safety_checker=None,
                                                                  requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_edit(d, photo, scheduler=None, seed=3, num=1, output_type="latent", generator=None, **kw):
    from ipadapter_instruct.engine.loading import make_scheduler
    base = d.scheduler if not hasattr(d, "_base_scheduler") else d._base_scheduler
    d._base_scheduler = base
    d.scheduler = make_scheduler(base, scheduler)
    generator = generator or torch.Generator("cpu").manual_seed(seed)
    return d(EDIT, image=photo, num_inference_steps=STEPS, generator=generator,
             num_images_per_prompt=num, output_type=output_type, **kw).images


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "euler_a", "dpmpp_2m"])
def test_latents_match_diffusers(edit_pipe, d_edit, photo, scheduler):
    want = diffusers_edit(d_edit, photo, scheduler, num=2)
    got = edit_pipe(EDIT, photo, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3),
                    scheduler=scheduler, num_images_per_prompt=2, output_type="latent")
    assert got.shape == want.shape == (2, 4, 17, 13)  # 70 x 54 px -> 68 x 52 -> latents / 4
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got[0] - got[1]).abs().max() > 1e-2  # two images per prompt differ
    # a seed: image j from its own generator seeded seed + j (so each image's seed gives it back)
    want = diffusers_edit(d_edit, photo, scheduler, num=2, generator=[torch.Generator().manual_seed(s) for s in (3, 4)])
    got = edit_pipe(EDIT, photo, num_inference_steps=STEPS, seed=3, scheduler=scheduler, num_images_per_prompt=2,
                    output_type="latent")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_pngs_match_diffusers_within_one_grey_level(edit_pipe, d_edit, photo):
    want = diffusers_edit(d_edit, photo, output_type="pil")[0]
    got = edit_pipe(EDIT, photo, num_inference_steps=STEPS, seed=3)[0]
    assert got.size == want.size == (52, 68)
    assert np.abs(np.asarray(got, int) - np.asarray(want, int)).max() <= 1


def test_guidance_off_and_scales_as_diffusers(edit_pipe, d_edit, photo):
    for s_t, s_i in ((1.0, 1.5), (7.5, 0.5), (3.0, 2.0)):  # the first two: guidance off in diffusers
        want = diffusers_edit(d_edit, photo, guidance_scale=s_t, image_guidance_scale=s_i)
        got = edit_pipe(EDIT, photo, num_inference_steps=STEPS, seed=3, guidance_scale=s_t, image_guidance_scale=s_i,
                        output_type="latent")
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("s_t, s_i", [(7.5, 1.5), (2.5, 3.0)])
def test_three_distinct_branch_weights_as_diffusers(edit_pipe, d_edit, photo, s_t, s_i):
    """Scales whose three branch weights all differ (the (3, 2) case above weighs the image and neither branches
    equally, -1 and -1, so swapping those two would pass it): the text+image, image-only and neither branches each
    weighed as diffusers does."""
    from ipadapter_instruct.engine.edit import edit_weights

    assert len(set(edit_weights(s_t, s_i))) == 3
    want = diffusers_edit(d_edit, photo, guidance_scale=s_t, image_guidance_scale=s_i)
    got = edit_pipe(EDIT, photo, num_inference_steps=STEPS, seed=3, guidance_scale=s_t, image_guidance_scale=s_i,
                    output_type="latent")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_unit_scales_reduce_to_the_text_and_image_branch(edit_pipe, photo):
    """s_T = s_I = 1: the combination's weights are exactly (1, 0, 0), and the pipeline runs that branch alone: the
    negative prompt (read only by the other two) changes nothing, bitwise."""
    from ipadapter_instruct.engine.edit import edit_branches, edit_weights

    assert edit_weights(1.0, 1.0) == (1.0, 0.0, 0.0)
    assert [b[0] for b in edit_branches(1.0, 1.0)] == ["text_image"]
    assert [w for *_, w in edit_branches(7.5, 1.5)] == [7.5, -6.0, -0.5]
    kw = dict(num_inference_steps=STEPS, seed=1, guidance_scale=1.0, image_guidance_scale=1.0, output_type="latent")
    assert torch.equal(edit_pipe(EDIT, photo, "blurry", **kw), edit_pipe(EDIT, photo, "another negative", **kw))
    full = dict(kw, guidance_scale=7.5, image_guidance_scale=1.5)
    assert not torch.equal(edit_pipe(EDIT, photo, "blurry", **full), edit_pipe(EDIT, photo, "another negative", **full))


def test_a_batch_equals_each_request_alone(edit_pipe, photo, other_image):
    photos = [photo, other_image.resize((54, 70))]
    kw = dict(num_inference_steps=STEPS, scheduler="euler_a", output_type="latent")
    both = edit_pipe([EDIT, "turn it into a painting"], photos, seed=[1, 2], guidance_scale=[7.5, 4.0],
                     image_guidance_scale=[1.5, 1.2], **kw)
    alone = [edit_pipe(EDIT, photos[0], seed=1, **kw),
             edit_pipe("turn it into a painting", photos[1], seed=2, guidance_scale=4.0, image_guidance_scale=1.2, **kw)]
    # euler_a's latents start at sigma ~14.6: 1e-4 relative is float32 noise of batched convolutions there, and an
    # AVX2 CPU (AMD EPYC) blocks a batch of 2 differently from 1: 2 of 1768 elements 1.6e-4 off (BATCH_TOL)
    torch.testing.assert_close(both, torch.cat(alone), atol=BATCH_TOL, rtol=1e-4)


def test_height_and_width_resize_the_photo(edit_pipe, photo):
    out = edit_pipe(EDIT, photo, num_inference_steps=1, height=32, width=48)
    assert out[0].size == (48, 32)


@pytest.mark.parametrize("call, message", [
    (dict(image=None), "an image to edit is required"),
    (dict(image="/nonexistent.png"), "/nonexistent.png"),
    (dict(height=30, width=32), "multiples of the VAE factor 4"),
    (dict(num_inference_steps=0), "steps must be a positive integer"),
])
def test_bad_input_is_one_line(edit_pipe, photo, call, message):
    args = dict(prompt=EDIT, image=photo, num_inference_steps=1)
    with pytest.raises(EngineError, match=message) as e:
        edit_pipe(**{**args, **call})
    assert "\n" not in str(e.value)


def test_models_of_the_other_kind_are_named(tiny, tiny_edit):
    from ipadapter_instruct.engine import EditPipeline, Pipeline
    # read off the folder's configs before any weight loads (engine/preflight.py)
    with pytest.raises(EngineError, match="is a text-to-image SD1.5 model, not an InstructPix2Pix one .*python -m engine "
                                          "generate"):
        EditPipeline.from_pretrained(tiny["model"], device="cpu")
    with pytest.raises(EngineError, match="is an InstructPix2Pix model .*python -m engine edit"):
        Pipeline.from_pretrained(tiny_edit["model"], device="cpu")


# ----- with an adapter -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plus_edit_dir(tiny_edit, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    from ipadapter_instruct.engine.tiny import tiny_adapter
    folder = tmp_path_factory.mktemp("plus-edit")
    torch.manual_seed(1)
    tiny_adapter(str(folder / "plus.safetensors"),
                 UNet2DConditionModel.from_pretrained(tiny_edit["model"], subfolder="unet"), kind="plus")
    return folder


def test_ip_adapter_plus_matches_diffusers(tiny_edit, plus_edit_dir, photo, cond_image):
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from transformers import CLIPVisionModelWithProjection

    from ipadapter_instruct.engine import EditPipeline
    from ipadapter_instruct.engine.loading import _image_processor_class

    d = StableDiffusionInstructPix2PixPipeline.from_pretrained(
        tiny_edit["model"], safety_checker=None, requires_safety_checker=False,
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(tiny_edit["image_encoder"]),
        feature_extractor=_image_processor_class().from_pretrained(tiny_edit["image_encoder"]))
    d.load_ip_adapter(str(plus_edit_dir), subfolder="", weight_name="plus.safetensors", image_encoder_folder=None)
    d.set_ip_adapter_scale(0.7)
    d.set_progress_bar_config(disable=True)
    want = diffusers_edit(d, photo, ip_adapter_image=cond_image)
    pipe = EditPipeline.from_pretrained(tiny_edit["model"], image_encoder=tiny_edit["image_encoder"],
                                        adapter=str(plus_edit_dir / "plus.safetensors"), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    got = pipe(EDIT, photo, adapter_image=cond_image, scale=0.7, num_inference_steps=STEPS, seed=3,
               output_type="latent")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    plain = pipe(EDIT, photo, adapter_image=cond_image, scale=0.0, num_inference_steps=STEPS, seed=3,
                 output_type="latent")
    assert (plain - got).abs().max() > 1e-3  # the adapter matters, or the comparison proves nothing


def test_instruct_adapter_at_scale_zero_is_plain_ip2p(tiny_edit, edit_pipe, photo, cond_image):
    from ipadapter_instruct.engine import EditPipeline
    pipe = EditPipeline.from_pretrained(tiny_edit["model"], image_encoder=tiny_edit["image_encoder"],
                                        adapter=tiny_edit["adapter"], device="cpu")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=STEPS, seed=5, output_type="latent")
    zero = pipe(EDIT, photo, adapter_image=cond_image, instruct="use the style of this image", scale=0.0, **kw)
    assert torch.equal(zero, edit_pipe(EDIT, photo, **kw))
    styled = pipe(EDIT, photo, adapter_image=cond_image, instruct="use the style of this image", scale=0.8, **kw)
    assert (styled - zero).abs().max() > 1e-3
    with pytest.raises(EngineError, match="give ip_adapter_image="):
        pipe(EDIT, photo, **kw)


# ----- the CLI -----------------------------------------------------------------------------------------------------

def run_cli(*args):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def test_cli_edit_writes_the_pipelines_image(tiny_edit, edit_pipe, photo, tmp_path):
    src = tmp_path / "photo.png"
    photo.save(src)
    out = tmp_path / "edited.png"
    r = run_cli("edit", "--model", tiny_edit["model"], "--image", str(src), "--prompt", EDIT, "--steps", "3",
                "--seed", "2", "--device", "cpu", "--no-progress", "--out", str(out))
    assert r.returncode == 0, r.stderr
    want = edit_pipe(EDIT, photo, num_inference_steps=3, seed=2)[0]
    assert np.abs(np.asarray(Image.open(out).convert("RGB"), int) - np.asarray(want, int)).max() <= 1


def test_cli_edit_errors_are_one_line_and_leave_no_file(tiny, tiny_edit, photo, tmp_path):
    src = tmp_path / "photo.png"
    photo.save(src)
    out = tmp_path / "edited.png"
    for args, message in (
            (["--model", tiny["model"], "--image", str(src)], "text-to-image SD1.5 model"),
            (["--model", tiny_edit["model"], "--image", str(tmp_path / "none.png")], "none.png"),
            (["--model", tiny_edit["model"], "--image", str(src), "--height", "30", "--width", "32"], "multiples of the VAE factor 4"),
            (["--model", tiny_edit["model"], "--image", str(src), "--steps", "0"], "positive integer")):
        r = run_cli("edit", *args, "--prompt", EDIT, "--device", "cpu", "--out", str(out))
        assert r.returncode in (1, 2) and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
        assert not out.exists()


def test_make_tiny_edit_writes_an_ip2p_folder(tmp_path):
    import json
    r = run_cli("make-tiny", str(tmp_path / "w"), "--edit")
    assert r.returncode == 0, r.stderr
    index = json.loads((tmp_path / "w" / "model" / "model_index.json").read_text())
    unet = json.loads((tmp_path / "w" / "model" / "unet" / "config.json").read_text())
    assert index["_class_name"] == "StableDiffusionInstructPix2PixPipeline" and unet["in_channels"] == 8


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU (the fused kernels and CUDA graphs)")
@pytest.mark.gpu
def test_fast_path_equals_eager_on_the_gpu(tiny_edit, photo):
    from ipadapter_instruct.engine import EditPipeline
    eager = EditPipeline.from_pretrained(tiny_edit["model"], device="cuda", dtype="float32", attention_backend="sdpa")
    fast = EditPipeline.from_pretrained(tiny_edit["model"], device="cuda", dtype="float32")
    fast.enable_cuda_graphs()
    kw = dict(num_inference_steps=STEPS, seed=3, output_type="latent")
    want = eager(EDIT, photo, **kw)
    for _ in range(2):  # capture, then replay with the image latent in the static buffers
        torch.testing.assert_close(fast(EDIT, photo, **kw), want, atol=2e-3, rtol=2e-3)


def test_static_buffers_carry_the_image_latent(edit_pipe, photo, other_image):
    """The CUDA-graph path's static buffers, run eagerly (capture needs a GPU): the 8-channel input (latents and
    the photo latent) goes through them, and a second call with another photo and seed reuses the entry."""
    from ipadapter_instruct.engine.cuda_graphs import StaticUNet

    kw = dict(num_inference_steps=STEPS, output_type="latent")
    want = [edit_pipe(EDIT, photo, seed=3, **kw), edit_pipe(EDIT, other_image.resize((54, 70)), seed=4, **kw)]
    edit_pipe._static = StaticUNet(edit_pipe.unet, capture=False)
    try:
        got = [edit_pipe(EDIT, photo, seed=3, **kw), edit_pipe(EDIT, other_image.resize((54, 70)), seed=4, **kw)]
        assert len(edit_pipe._static.entries) == 1
    finally:
        edit_pipe._static = None
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


EDIT_FLIGHTS = [dict(num_inference_steps=5, seed=3),
                dict(num_inference_steps=3, seed=4, scheduler="euler_a", guidance_scale=5.0, image_guidance_scale=1.2,
                     prompt="make it night"),
                dict(num_inference_steps=4, seed=5, guidance_scale=1.0, scheduler="ddim")]  # one branch, no guidance


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static-buffers"])
def test_edit_flights_joining_mid_flight_equal_alone(edit_pipe, photo, other_image, static):
    """Step-level batching of edits: each flight carries its photo latent per row beside its text rows, so edits
    with other photos, steps, schedulers (an ancestral one) and guidance join mid-flight and give what each gives
    alone; the same through the CUDA-graph static buffers (eager here) with the rows padded to a bucket."""
    from ipadapter_instruct.engine.cuda_graphs import StaticUNet

    photos = [photo, other_image.resize((54, 70)), photo]
    reqs = [dict({"prompt": EDIT, **r}, image=p, output_type="latent") for r, p in zip(EDIT_FLIGHTS, photos)]
    wants = [edit_pipe(**r) for r in reqs]
    if static:
        edit_pipe._static = StaticUNet(edit_pipe.unet, capture=False)
    try:  # 1 joins at 0's second step, 2 at its third
        out = fly(edit_pipe, reqs, {0: [0], 1: [1], 2: [2]})
        padded = {k[0][0] for k in edit_pipe._static.entries} if static else None
    finally:
        edit_pipe._static = None
    for i, want in enumerate(wants):
        torch.testing.assert_close(out[i], want, atol=BATCH_TOL, rtol=1e-4, msg=lambda m, i=i: f"edit {i}: {m}")
    if static:
        assert 8 in padded and padded <= {1, 2, 4, 8}  # 3 + 3 + 1 rows ran as 8
    together = edit_pipe.start_many(prompt=[EDIT, "make it night"], image=photos[:2], seed=[3, 4],
                                    num_inference_steps=3, output_type="latent")
    while not together[0].done:
        edit_pipe.step(together)
    for f, prompt, p, seed in zip(together, (EDIT, "make it night"), photos[:2], (3, 4)):
        want = edit_pipe(prompt, p, seed=seed, num_inference_steps=3, output_type="latent")
        torch.testing.assert_close(edit_pipe.finish(f), want, atol=BATCH_TOL, rtol=1e-4)
