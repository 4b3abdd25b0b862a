"""IPAdapter-Instruct on SDXL against an independent re-implementation of the reference release's SDXL loop
(unity-research/IP-Adapter-Instruct: IPAdapterInstructSDXL.generate and StableDiffusionXLPipelineExtraCFG), on tiny
random SDXL weights with a tiny Instruct adapter in the two-key layout.

The reference side shares no code with the engine: diffusers' own `encode_prompt` for the UNet's tokens and pooled
embeddings, the projector written out functionally from the raw checkpoint tensors (tests/test_reference_instruct.py),
diffusers' `IPAdapterAttnProcessor2_0` with text and adapter tokens concatenated, as the release feeds them, and
the release's branches: the projector reads the first text encoder's last hidden states; the image-only and
unconditional branches read "" as instruction and prompt; every branch but the unconditional one takes the prompt's
pooled embedding; time ids [H, W, 0, 0, H, W] for every row; DDIM, as the release's demo."""
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from test_reference_instruct import ref_projector, reference_ip_processors, release_guidance

STEPS = 3
PROMPT, NEG = "a photo of a firefighter", "monochrome, lowres, bad anatomy, worst quality, low quality"


@pytest.fixture(scope="module")
def sdxl_instruct(tmp_path_factory):
    from ipadapter_instruct.engine.tiny import make_tiny_sdxl
    paths = make_tiny_sdxl(str(tmp_path_factory.mktemp("sdxl-instruct") / "tiny"))
    return {**paths, "adapter": paths["instruct"]}


@pytest.fixture(scope="module")
def pipe(sdxl_instruct):
    from ipadapter_instruct.engine import Pipeline
    p = Pipeline.from_pretrained(sdxl_instruct["model"], image_encoder=sdxl_instruct["image_encoder"],
                                 adapter=sdxl_instruct["adapter"], device="cpu")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def image():
    return Image.fromarray((np.random.RandomState(1).rand(64, 64, 3) * 255).astype("uint8"))


def reference_generate(paths, image, instruction, scale, g, gi, gimg, seed, simple):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    from transformers import CLIPVisionModelWithProjection

    from ipadapter_instruct.engine.loading import _image_processor_class

    pipe = StableDiffusionXLPipeline.from_pretrained(paths["model"])
    unet = pipe.unet
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    proj_sd = reference_ip_processors(unet, paths["adapter"], scale)

    def small(text):  # the release: pipe.text_encoder(ids)[0], the first encoder's last hidden state
        ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0]

    tokens, neg_tokens, pooled, neg_pooled = pipe.encode_prompt(
        PROMPT, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=True,
        negative_prompt=NEG)
    encoder = CLIPVisionModelWithProjection.from_pretrained(paths["image_encoder"])
    pixels = _image_processor_class().from_pretrained(paths["image_encoder"])(
        images=[image], return_tensors="pt").pixel_values
    clip = encoder(pixels, output_hidden_states=True).hidden_states[-2]
    clip0 = encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
    heads = proj_sd["layers.0.0.to_q.weight"].shape[0] // 64 or 1
    P = lambda c, i, p: ref_projector(proj_sd, c, i, p, heads)  # noqa: E731
    empty, prompt = small(""), small(PROMPT)
    full = torch.cat([tokens, P(clip, small(instruction), prompt)], 1)
    uncond = torch.cat([neg_tokens, P(clip0, empty, empty)], 1)
    img_only = torch.cat([neg_tokens, P(clip, empty, empty)], 1)
    every = torch.cat([neg_tokens, P(clip, small("everything"), prompt)], 1)
    if simple:
        cond, pooled_rows = torch.cat([full, uncond]), torch.cat([pooled, neg_pooled])
    else:
        cond = torch.cat([full, img_only, every, uncond])
        pooled_rows = torch.cat([pooled, pooled, pooled, neg_pooled])
    size = unet.config.sample_size * pipe.vae_scale_factor
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).repeat(cond.shape[0], 1)

    sched.set_timesteps(STEPS)
    shape = (1, 4, unet.config.sample_size, unet.config.sample_size)
    latents = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed)) * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.scale_model_input(torch.cat([latents] * cond.shape[0]), t)
        eps = unet(x, t, encoder_hidden_states=cond,
                   added_cond_kwargs={"text_embeds": pooled_rows, "time_ids": time_ids}).sample
        eps = release_guidance(eps, simple, g, gi, gimg)  # (its SDXL pipeline batches [uncond, cond]: same sum)
        latents = sched.step(eps, t, latents, eta=0.0).prev_sample
    return latents


@pytest.mark.parametrize("instruction,simple", [("use the style of this image", True),
                                                ("use the composition from the image", False)])
def test_instruct_sdxl_matches_the_release_loop(sdxl_instruct, pipe, image, instruction, simple):
    kw = dict(scale=0.9, g=7.0, gi=6.0, gimg=0.5, seed=5)  # the release demo's settings
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = reference_generate(sdxl_instruct, image, instruction, simple=simple, **kw)
    ours = pipe(PROMPT, image, instruction, negative_prompt=NEG, scale=kw["scale"], guidance_scale=kw["g"],
                instruct_guidance_scale=kw["gi"], image_guidance_scale=kw["gimg"], num_inference_steps=STEPS,
                seed=kw["seed"], scheduler="ddim", output_type="latent")
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_instruction_and_scale_act(pipe, image):
    a, b = (pipe(PROMPT, image, text, scale=1.0, num_inference_steps=STEPS, seed=3, guidance_mode="full",
                 output_type="latent") for text in ("take the object", "keep the composition"))
    assert (a - b).abs().max() > 1e-3
    base = pipe(PROMPT, image, "take the object", scale=0.0, num_inference_steps=STEPS, seed=3,
                guidance_mode="simple", output_type="latent")
    assert (a - base).abs().max() > 1e-3


def test_a_batch_equals_each_request_alone(pipe, image):
    other = image.transpose(Image.FLIP_TOP_BOTTOM)
    reqs = [dict(prompt=PROMPT, image=image, instruct="use the style of this image", scale=0.9, seed=1),
            dict(prompt="a red boat", image=other, instruct="take the object", scale=0.5, seed=2)]
    batch = pipe(**{k: [r[k] for r in reqs] for k in reqs[0]}, num_inference_steps=STEPS, output_type="latent")
    for i, r in enumerate(reqs):
        alone = pipe(**r, num_inference_steps=STEPS, output_type="latent")
        torch.testing.assert_close(batch[i:i + 1], alone, atol=1e-4, rtol=1e-4)


def test_the_fused_kernels_on_sdxl(pipe, image):
    """The Triton decoupled attention and projector (the interpreter here) against the SDPA reference path, on
    SDXL's two-encoder tokens, added conditioning and 4-branch guidance."""
    # one step at 32 px: the interpreted kernels' cost grows with the queries and the UNet calls
    kw = dict(prompt=PROMPT, image=image, instruct="take the object", scale=0.9, num_inference_steps=1, seed=4,
              guidance_mode="full", output_type="latent", height=32, width=32)
    before = pipe.attention_backend
    pipe.set_attention_backend("sdpa")
    want = pipe(**kw)
    pipe.set_attention_backend("triton")
    try:
        got = pipe(**kw)
    finally:
        pipe.set_attention_backend(before)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
