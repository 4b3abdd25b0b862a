"""Cross-checks against diffusers itself on the same tiny weights: its IP-Adapter+ support
(`load_ip_adapter` + `IPAdapterAttnProcessor2_0`) and its plain StableDiffusionPipeline."""
import numpy as np
import pytest
import torch
from conftest import NEGATIVE, PROMPT

STEPS = 4


def diffusers_pipe(tiny, plus_dir=None, weight_name="plus.safetensors"):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPVisionModelWithProjection

    from ipadapter_instruct.engine.loading import _image_processor_class

    kwargs = {}
    if plus_dir is not None:
        kwargs = dict(image_encoder=CLIPVisionModelWithProjection.from_pretrained(tiny["image_encoder"]),
                      feature_extractor=_image_processor_class().from_pretrained(tiny["image_encoder"]))
    pipe = StableDiffusionPipeline.from_pretrained(tiny["model"], safety_checker=None, requires_safety_checker=False,
                                                   **kwargs)
    if plus_dir is not None:
        pipe.load_ip_adapter(str(plus_dir), subfolder="", weight_name=weight_name, image_encoder_folder=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def d_plus(tiny, plus_dir):
    return diffusers_pipe(tiny, plus_dir)


@pytest.fixture(scope="module")
def d_base(tiny):
    return diffusers_pipe(tiny)


def run_diffusers(pipe, image=None, output_type="latent", seed=7, guidance_scale=6.0, generator=None, **kw):
    if image is not None:
        kw["ip_adapter_image"] = image
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=guidance_scale,
               generator=generator or torch.Generator("cpu").manual_seed(seed), output_type=output_type, **kw).images
    return out


def plus_latents(pipe, image, scale):
    return pipe(PROMPT, image, negative_prompt=NEGATIVE, scale=scale, num_inference_steps=STEPS, seed=7,
                output_type="latent")


@pytest.mark.parametrize("scale,other", [(0.5, 0.0), (1.0, 0.0), ({"up": {"block_1": [0.0, 1.0]}}, 1.0)])
def test_plus_adapter_matches_diffusers(d_plus, plus_pipe, cond_image, scale, other):
    # a float, or an InstantStyle-style per-block dict: one transformer on, the rest off
    d_plus.set_ip_adapter_scale(scale)
    ref = run_diffusers(d_plus, cond_image)
    ours = plus_latents(plus_pipe, cond_image, scale)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    # another scale must change the result, or the comparison proves nothing
    assert (ours - plus_latents(plus_pipe, cond_image, other)).abs().max() > 1e-3


def test_plus_adapter_images_match_diffusers(d_plus, plus_pipe, cond_image):
    d_plus.set_ip_adapter_scale(0.8)
    ref = run_diffusers(d_plus, cond_image, output_type="pil")
    ours = plus_pipe(PROMPT, cond_image, negative_prompt=NEGATIVE, scale=0.8, num_inference_steps=STEPS, seed=7)
    assert len(ours) == len(ref) == 1
    diff = np.abs(np.asarray(ours[0], dtype=np.int16) - np.asarray(ref[0], dtype=np.int16))
    assert diff.max() <= 1, diff.max()


@pytest.mark.parametrize("name,cls", [("ddim", "DDIMScheduler"), ("euler", "EulerDiscreteScheduler"),
                                      ("euler_a", "EulerAncestralDiscreteScheduler"),
                                      ("dpmpp_2m", "DPMSolverMultistepScheduler"), ("pndm", "PNDMScheduler"),
                                      ("lcm", "LCMScheduler"), ("tcd", "TCDScheduler")])
def test_schedulers_and_seeds_match_diffusers(d_plus, plus_pipe, cond_image, name, cls):
    import diffusers
    original = d_plus.scheduler
    d_plus.scheduler = getattr(diffusers, cls).from_config(original.config)
    try:
        d_plus.set_ip_adapter_scale(0.7)
        ref = run_diffusers(d_plus, cond_image, seed=11, num_images_per_prompt=2)
        # a seed: image j from its own generator seeded seed + j (so each image's seed gives it back)
        per_image = run_diffusers(d_plus, cond_image, num_images_per_prompt=2,
                                  generator=[torch.Generator("cpu").manual_seed(s) for s in (11, 12)])
    finally:
        d_plus.scheduler = original
    kw = dict(negative_prompt=NEGATIVE, scale=0.7, num_inference_steps=STEPS, num_images_per_prompt=2,
              scheduler=name, output_type="latent")
    ours = plus_pipe(PROMPT, cond_image, generator=torch.Generator("cpu").manual_seed(11), **kw)
    # LCM and TCD step to the denoised sample, where float32 rounding of a different op order than diffusers' shows:
    # on an AVX2 CPU (AMD EPYC) 2 of 2048 elements differ by 2.3e-4; on AVX-512 machines all were within 1e-4
    tol = 5e-4 if name in ("lcm", "tcd") else 1e-4
    torch.testing.assert_close(ours, ref, atol=tol, rtol=1e-4)
    torch.testing.assert_close(plus_pipe(PROMPT, cond_image, seed=11, **kw), per_image, atol=tol, rtol=1e-4)


@pytest.mark.parametrize("instruct,mode", [("use the style of this image", "simple"), ("take the object", "full")])
def test_scale_zero_equals_plain_stable_diffusion(d_base, instruct_pipe, cond_image, instruct, mode):
    # full mode at scale 0: full = prompt, the other three = negative, so eps = u + gi (c - u): plain CFG at gi
    ref = run_diffusers(d_base, guidance_scale=5.0)
    ours = instruct_pipe(PROMPT, cond_image, instruct, negative_prompt=NEGATIVE, scale=0.0, guidance_scale=5.0,
                         instruct_guidance_scale=5.0, guidance_mode=mode, num_inference_steps=STEPS, seed=7,
                         output_type="latent")
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_no_guidance_matches_diffusers(d_base, instruct_pipe, cond_image):
    ref = run_diffusers(d_base, guidance_scale=1.0)
    ours = instruct_pipe(PROMPT, cond_image, "take the object", negative_prompt=NEGATIVE, scale=0.0,
                         guidance_scale=1.0, num_inference_steps=STEPS, seed=7, output_type="latent")
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
