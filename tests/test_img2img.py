"""img2img and inpainting (engine/img2img.py) against diffusers' own pipelines on the same tiny weights:
StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline (a 4-channel model, and a 9-channel inpainting
model), each with the same IP-Adapter+ file loaded through diffusers' `load_ip_adapter`; IPAdapter-Instruct through an
independent loop written from diffusers' parts; batching, seeds and bad inputs."""
import numpy as np
import pytest
import torch
from conftest import NEGATIVE, PROMPT, fly, load_pipe
from PIL import Image

from ipadapter_instruct.engine.errors import EngineError

STEPS = 4


@pytest.fixture(scope="module")
def photo():
    g = torch.Generator().manual_seed(11)
    return Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy())


@pytest.fixture(scope="module")
def photo2():
    g = torch.Generator().manual_seed(12)
    return Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy())


@pytest.fixture(scope="module")
def mask():
    m = np.zeros((64, 64), dtype=np.uint8)
    m[12:44, 20:60] = 255  # white: repaint
    return Image.fromarray(m)


def diffusers_pipe(cls, model, tiny, plus_dir):
    from transformers import CLIPVisionModelWithProjection

    from ipadapter_instruct.engine.loading import _image_processor_class

    pipe = cls.from_pretrained(model, safety_checker=None, requires_safety_checker=False,
                               image_encoder=CLIPVisionModelWithProjection.from_pretrained(tiny["image_encoder"]),
                               feature_extractor=_image_processor_class().from_pretrained(tiny["image_encoder"]))
    pipe.load_ip_adapter(str(plus_dir), subfolder="", weight_name="plus.safetensors", image_encoder_folder=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def d_img2img(tiny, plus_dir):
    from diffusers import StableDiffusionImg2ImgPipeline
    return diffusers_pipe(StableDiffusionImg2ImgPipeline, tiny["model"], tiny, plus_dir)


@pytest.fixture(scope="module")
def d_inpaint(tiny, plus_dir):
    from diffusers import StableDiffusionInpaintPipeline
    return diffusers_pipe(StableDiffusionInpaintPipeline, tiny["model"], tiny, plus_dir)


@pytest.fixture(scope="module")
def d_inpaint9(tiny, tiny_inpaint, plus_dir):
    from diffusers import StableDiffusionInpaintPipeline
    return diffusers_pipe(StableDiffusionInpaintPipeline, tiny_inpaint["model"], tiny, plus_dir)


@pytest.fixture(scope="module")
def plus9(tiny, tiny_inpaint, plus_dir):
    """The 9-channel inpainting model with the IP-Adapter+ file (its attention layers are the 4-channel UNet's)."""
    return load_pipe({**tiny, "model": tiny_inpaint["model"]}, plus_dir / "plus.safetensors")


@pytest.fixture(scope="module")
def base_pipe(tiny):
    return load_pipe(tiny, None)


def scheduled(d, name):
    """diffusers' pipeline with the scheduler the engine's `scheduler=name` picks (None: the model's own)."""
    from diffusers import EulerAncestralDiscreteScheduler
    if name is not None:
        d.scheduler = EulerAncestralDiscreteScheduler.from_config(d.scheduler.config)
    return d


def ours(pipe, cond_image, output_type="latent", **kw):
    kw = {"seed": 3, "num_inference_steps": STEPS, "guidance_scale": 6.0, "scale": 0.7, **kw}
    return pipe(PROMPT, ip_adapter_image=cond_image, negative_prompt=NEGATIVE, output_type=output_type, **kw)


def theirs(d, cond_image, output_type="latent", seed=3, **kw):
    d.set_ip_adapter_scale(kw.pop("scale", 0.7))
    kw = {"num_inference_steps": STEPS, "guidance_scale": 6.0, **kw}
    kw.setdefault("generator", torch.Generator().manual_seed(seed))
    return d(PROMPT, ip_adapter_image=cond_image, negative_prompt=NEGATIVE, output_type=output_type, **kw).images


@pytest.mark.parametrize("strength", [0.5, 1.0])
@pytest.mark.parametrize("scheduler", [None, "euler_a"])
def test_img2img_matches_diffusers(plus_pipe, d_img2img, cond_image, photo, strength, scheduler):
    config = d_img2img.scheduler
    try:
        want = theirs(scheduled(d_img2img, scheduler), cond_image, image=photo, strength=strength)
    finally:
        d_img2img.scheduler = config
    got = ours(plus_pipe, cond_image, init_image=photo, strength=strength, scheduler=scheduler)
    assert got.shape == want.shape == (1, 4, 16, 16)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_img2img_png_within_one_grey_level(plus_pipe, d_img2img, cond_image, photo):
    want = np.asarray(theirs(d_img2img, cond_image, "pil", image=photo, strength=0.6)[0], dtype=int)
    got = np.asarray(ours(plus_pipe, cond_image, "pil", init_image=photo, strength=0.6)[0], dtype=int)
    assert got.shape == want.shape and np.abs(got - want).max() <= 1


@pytest.mark.parametrize("strength", [0.6, 1.0])
@pytest.mark.parametrize("channels", [4, 9])
def test_inpainting_matches_diffusers(plus_pipe, plus9, d_inpaint, d_inpaint9, cond_image, photo, mask, strength,
                                      channels):
    pipe, d = (plus_pipe, d_inpaint) if channels == 4 else (plus9, d_inpaint9)
    assert pipe.unet.config.in_channels == channels
    want = theirs(d, cond_image, image=photo, mask_image=mask, strength=strength)
    got = ours(pipe, cond_image, init_image=photo, mask_image=mask, strength=strength)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    png_want = np.asarray(theirs(d, cond_image, "pil", image=photo, mask_image=mask, strength=strength)[0], dtype=int)
    png_got = np.asarray(ours(pipe, cond_image, "pil", init_image=photo, mask_image=mask, strength=strength)[0],
                         dtype=int)
    assert np.abs(png_got - png_want).max() <= 1


@pytest.mark.parametrize("channels", [4, 9])
def test_inpainting_with_an_ancestral_scheduler_matches_diffusers(plus_pipe, plus9, d_inpaint, d_inpaint9, cond_image,
                                                                  photo, mask, channels):
    # the scheduler's own draws come after the latents' from the same generator: the order must be diffusers'
    pipe, d = (plus_pipe, d_inpaint) if channels == 4 else (plus9, d_inpaint9)
    config = d.scheduler
    try:
        want = theirs(scheduled(d, "euler_a"), cond_image, image=photo, mask_image=mask, strength=0.75)
    finally:
        d.scheduler = config
    got = ours(pipe, cond_image, init_image=photo, mask_image=mask, strength=0.75, scheduler="euler_a")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_black_mask_keeps_the_photo(plus_pipe, d_inpaint, cond_image, photo):
    """Nothing to repaint: a 4-channel UNet's result is the photo's latent (its first draw from the seed), as
    diffusers leaves it."""
    black = Image.new("L", photo.size, 0)
    got = ours(plus_pipe, cond_image, init_image=photo, mask_image=black, strength=0.7)
    want = theirs(d_inpaint, cond_image, image=photo, mask_image=black, strength=0.7)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    pixels = d_inpaint.image_processor.preprocess(photo, height=64, width=64)
    with torch.no_grad():
        latent = d_inpaint.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, latent * d_inpaint.vae.config.scaling_factor, atol=1e-5, rtol=1e-5)


def test_one_call_of_mixed_requests_equals_each_alone(plus_pipe, cond_image, photo, photo2, mask):
    """Different photos, strengths (of one start step and of different ones), masks and text-to-image in one call:
    each request's latents are its own call's."""
    requests = [dict(init_image=photo, strength=0.5, seed=1), dict(init_image=photo2, strength=0.6, seed=2),
                dict(init_image=photo, mask_image=mask, strength=0.55, seed=3), dict(seed=4),
                dict(init_image=photo2, strength=1.0, seed=5)]
    batch = {k: [r.get(k) for r in requests] for k in ("init_image", "strength", "mask_image", "seed")}
    got = ours(plus_pipe, cond_image, height=64, width=64, **batch)
    assert got.shape[0] == len(requests) and got.seeds == [1, 2, 3, 4, 5]
    for i, r in enumerate(requests):
        alone = ours(plus_pipe, cond_image, height=64, width=64, **r)
        torch.testing.assert_close(got[i:i + 1], alone, atol=1e-4, rtol=1e-4, msg=f"request {i}")


def test_each_seed_gives_its_image_back(plus_pipe, cond_image, photo, mask):
    for kw in (dict(init_image=photo, strength=0.6), dict(init_image=photo, mask_image=mask, strength=0.8)):
        two = ours(plus_pipe, cond_image, num_images_per_prompt=2, seed=8, **kw)
        assert two.seeds == [8, 9]
        torch.testing.assert_close(two[1:], ours(plus_pipe, cond_image, seed=9, **kw), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("masked", [False, True])
def test_one_generator_for_several_images_draws_as_diffusers(plus_pipe, d_img2img, d_inpaint, cond_image, photo,
                                                             mask, masked):
    kw = dict(mask_image=mask) if masked else {}
    want = theirs(d_inpaint if masked else d_img2img, cond_image, image=photo, strength=0.7, num_images_per_prompt=2,
                  generator=torch.Generator().manual_seed(4), **kw)
    got = ours(plus_pipe, cond_image, init_image=photo, strength=0.7, num_images_per_prompt=2,
               generator=torch.Generator().manual_seed(4), **kw)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_flights_from_photos_equal_their_calls(plus_pipe, cond_image, photo, mask):
    """Step-level batching: an img2img flight (a shorter schedule) and an inpainting flight join text-to-image ones
    at other turns; each equals its call alone."""
    base = dict(prompt=PROMPT, ip_adapter_image=cond_image, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                scale=0.7, output_type="latent", height=64, width=64)
    requests = [dict(base, seed=1), dict(base, init_image=photo, strength=0.5, seed=2),
                dict(base, init_image=photo, mask_image=mask, strength=0.8, seed=3), dict(base, seed=4)]
    out = fly(plus_pipe, requests, joins={0: [0], 1: [1, 2], 2: [3]})
    for i, r in enumerate(requests):
        torch.testing.assert_close(out[i], plus_pipe(**r), atol=1e-4, rtol=1e-4, msg=f"flight {i}")


@pytest.mark.parametrize("instruction,simple", [("use the style of this image", True), ("take the object", False)])
def test_instruct_img2img_matches_an_independent_loop(tiny, instruct_pipe, cond_image, photo, instruction, simple):
    """IPAdapter-Instruct from a photo, in both guidance modes (the instruction picks: simple, or the release's four
    branches): the engine against a loop of diffusers' parts (its IP-Adapter processors, the release's projector and
    guidance, test_reference_instruct.py) started as diffusers' img2img starts."""
    import warnings

    from test_reference_instruct import STEPS as REFERENCE_STEPS
    from test_reference_instruct import reference_generate

    strength, seed = 0.6, 3
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = reference_generate(tiny, cond_image, instruction, 0.9, 4.0, 5.0, 1.5, seed, simple,
                                 start=(photo, strength))
    got = instruct_pipe(PROMPT, cond_image, instruction, negative_prompt=NEGATIVE, scale=0.9,
                        guidance_scale=4.0, instruct_guidance_scale=5.0, image_guidance_scale=1.5, seed=seed,
                        num_inference_steps=REFERENCE_STEPS, init_image=photo, strength=strength,
                        output_type="latent")
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw,says", [
    (dict(mask_image="MASK"), "mask_image was given without init_image"),
    (dict(strength=0.5), "strength was given without init_image"),
    (dict(init_image="PHOTO", strength=0.0), "strength must be in (0, 1]"),
    (dict(init_image="PHOTO", strength=1.5), "strength must be a finite number in [0, 1]"),
    (dict(init_image="PHOTO", mask_image="SMALL"), "the mask must be the photo's size"),
    (dict(init_image="PHOTO", strength=0.1), "runs no step"),
])
def test_bad_inputs_are_one_line_before_any_work(base_pipe, photo, mask, monkeypatch, kw, says):
    def boom(*a, **k):
        raise AssertionError("heavy work ran before the input was checked")
    for module in (base_pipe.unet, base_pipe.vae, base_pipe.text_encoder):
        monkeypatch.setattr(module, "forward", boom)
    monkeypatch.setattr(base_pipe.vae, "encode", boom)
    named = {"MASK": mask, "PHOTO": photo, "SMALL": mask.resize((32, 32))}
    kw = {k: named.get(v, v) if isinstance(v, str) else v for k, v in kw.items()}
    with pytest.raises(EngineError) as e:
        base_pipe("a cat", num_inference_steps=STEPS, seed=1, **kw)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_an_inpainting_model_needs_a_photo_and_a_mask(plus9, cond_image, photo):
    with pytest.raises(EngineError, match="inpainting model"):
        plus9("a cat", ip_adapter_image=cond_image, num_inference_steps=STEPS)
    with pytest.raises(EngineError, match="mask_image is required"):
        plus9("a cat", ip_adapter_image=cond_image, init_image=photo, num_inference_steps=STEPS)


def test_default_strengths_and_sizes_are_diffusers(base_pipe, photo, mask):
    wide = photo.resize((72, 40))
    f = base_pipe.vae_scale_factor
    out = base_pipe("a cat", init_image=wide, num_inference_steps=5, seed=1, output_type="latent")
    assert out.shape[-2:] == (40 // f, 72 // f)  # img2img: the photo's size, on the VAE grid
    assert base_pipe.STRENGTH == {"img2img": 0.8, "inpaint": 1.0}
    full = base_pipe("a cat", init_image=photo, mask_image=mask, num_inference_steps=5, seed=1, output_type="latent")
    assert full.shape[-2:] == (16, 16)  # inpainting: the model's native size


def test_a_request_that_overflows_fails_alone_across_start_groups(plus_pipe, cond_image, photo, monkeypatch):
    """Two requests starting at different steps run as two groups of one call; the one whose numbers overflow fails
    alone, named by its index in the whole call, and the other's image stands."""
    from ipadapter_instruct.engine import bounds
    from ipadapter_instruct.engine.combine import NonFinite

    good = dict(init_image=photo, strength=0.5, seed=1, guidance_scale=6.0)
    alone = ours(plus_pipe, cond_image, height=64, width=64, **good)
    monkeypatch.setattr(bounds, "number", lambda field, value, where="": float(value))  # the bounds off
    with pytest.raises(NonFinite) as e:
        ours(plus_pipe, cond_image, height=64, width=64, init_image=photo, strength=[0.5, 1.0], seed=[1, 2],
             guidance_scale=[6.0, 1e38])
    assert e.value.requests == [1]  # (the first request of its group)
    torch.testing.assert_close(e.value.outputs[:1], alone, atol=1e-4, rtol=1e-4)
