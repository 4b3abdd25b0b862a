"""IPAdapter-Instruct against an independent re-implementation of the reference release's loop.

The reference side shares no code with the engine: its projector is written out functionally from the raw
checkpoint tensors, its UNet uses diffusers' own `IPAdapterAttnProcessor2_0` (text and adapter tokens
concatenated, as the release feeds them), and guidance is the release's nested formula.
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import NEGATIVE, PROMPT

STEPS = 3


def ref_projector(sd, image, instruct, prompt, heads):
    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"])

    def lin(x, p):
        return x @ sd[p + ".weight"].T + (sd[p + ".bias"] if p + ".bias" in sd else 0)

    def attn(p, x, lat):
        x, ln_lat = ln(x, p + ".norm1"), ln(lat, p + ".norm2")
        q = lin(ln_lat, p + ".to_q")
        k, v = lin(torch.cat([x, ln_lat], 1), p + ".to_kv").chunk(2, -1)
        q, k, v = (t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
        return lin((w @ v).transpose(1, 2).flatten(2), p + ".to_out")

    def ff(p, x):
        return lin(F.gelu(lin(ln(x, p + ".0"), p + ".1")), p + ".3")

    x = lin(image, "proj_in")
    pr, ins = lin(prompt, "proj_prompt_input"), lin(instruct, "proj_new_input")
    lat = sd["latents"].repeat(image.shape[0], 1, 1)
    for i in range(4):
        for path, ctx in (("layers", x), ("prompt_layers", pr), ("new_input_layers", ins)):
            lat = attn(f"{path}.{i}.0", ctx, lat) + lat
            lat = ff(f"{path}.{i}.1", lat) + lat
    return F.layer_norm(lin(lat, "proj_out"), (sd["proj_out.weight"].shape[0],), sd["norm_out.weight"], sd["norm_out.bias"])


def release_guidance(eps, simple, g, gi, gimg):
    """The release's combination of the branch predictions: [full, uncond] or [full, img_only, every, uncond]."""
    if simple:
        c, u = eps.chunk(2)
        return u + g * (c - u)
    f, io, ev, u = eps.chunk(4)
    return u + gi * (f - ev) + g * (ev - io) + gimg * (io - u)


def reference_ip_processors(unet, adapter_file, scale):
    """diffusers' own IPAdapterAttnProcessor2_0 on every attn2 of `unet`, loaded from the adapter file's raw
    ip_adapter tensors by attn_processors index (AttnProcessor2_0 on attn1). -> the file's image_proj tensors."""
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

    from ipadapter_instruct.engine.adapter import read_adapter_file

    proj_sd, ip_sd = read_adapter_file(adapter_file)
    q_tokens = proj_sd["latents"].shape[1]
    procs, modules = {}, dict(unet.named_modules())
    for idx, name in enumerate(unet.attn_processors):
        if name.endswith("attn1.processor"):
            procs[name] = AttnProcessor2_0()
            continue
        attn = modules[name[: -len(".processor")]]
        p = IPAdapterAttnProcessor2_0(attn.to_k.out_features, unet.config.cross_attention_dim, (q_tokens,), scale)
        p.to_k_ip[0].weight.data.copy_(ip_sd[f"{idx}.to_k_ip.weight"])
        p.to_v_ip[0].weight.data.copy_(ip_sd[f"{idx}.to_v_ip.weight"])
        procs[name] = p
    unet.set_attn_processor(procs)
    return proj_sd


def reference_generate(tiny, image, instruction, scale, g, gi, gimg, seed, simple, start=None):
    """start: (photo, strength) to begin from a photo as diffusers' img2img does (its VAE sample, then the noise,
    from the seed's generator; the last int(steps x strength) steps)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPVisionModelWithProjection

    from ipadapter_instruct.engine.loading import _image_processor_class

    pipe = StableDiffusionPipeline.from_pretrained(tiny["model"], safety_checker=None, requires_safety_checker=False)
    unet, sched = pipe.unet, pipe.scheduler
    proj_sd = reference_ip_processors(unet, tiny["adapter"], scale)

    def enc(text):
        ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0]

    encoder = CLIPVisionModelWithProjection.from_pretrained(tiny["image_encoder"])
    pixels = _image_processor_class().from_pretrained(tiny["image_encoder"])(images=[image], return_tensors="pt").pixel_values
    clip = encoder(pixels, output_hidden_states=True).hidden_states[-2]
    clip0 = encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
    heads = proj_sd["layers.0.0.to_q.weight"].shape[0] // 64
    P = lambda c, i, p: ref_projector(proj_sd, c, i, p, heads)  # noqa: E731
    pos, neg = enc(PROMPT), enc(NEGATIVE)
    full = torch.cat([pos, P(clip, enc(instruction), pos)], 1)
    uncond = torch.cat([neg, P(clip0, enc(""), neg)], 1)
    img_only = torch.cat([neg, P(clip, neg, neg)], 1)
    every = torch.cat([neg, P(clip, enc("everything"), pos)], 1)
    cond = torch.cat([full, uncond]) if simple else torch.cat([full, img_only, every, uncond])

    sched.set_timesteps(STEPS)
    shape = (1, 4, tiny_latent_size(unet), tiny_latent_size(unet))
    gen, timesteps = torch.Generator("cpu").manual_seed(seed), sched.timesteps
    if start is None:
        latents = torch.randn(shape, generator=gen) * sched.init_noise_sigma
    else:
        photo, strength = start
        first = STEPS - int(STEPS * strength)
        timesteps = sched.timesteps[first:]
        pixels = pipe.image_processor.preprocess(photo)
        photo_latent = pipe.vae.encode(pixels).latent_dist.sample(gen) * pipe.vae.config.scaling_factor
        latents = sched.add_noise(photo_latent, torch.randn(shape, generator=gen), timesteps[:1])
    for t in timesteps:
        x = sched.scale_model_input(torch.cat([latents] * cond.shape[0]), t)
        eps = release_guidance(unet(x, t, encoder_hidden_states=cond).sample, simple, g, gi, gimg)
        latents = sched.step(eps, t, latents).prev_sample
    return latents


def tiny_latent_size(unet):
    return unet.config.sample_size


@pytest.mark.parametrize("instruction,simple", [("use the style of this image", True), ("take the object", False)])
def test_instruct_matches_reference_loop(tiny, instruct_pipe, cond_image, instruction, simple):
    kw = dict(scale=0.9, g=4.0, gi=5.0, gimg=1.5, seed=3)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = reference_generate(tiny, cond_image, instruction, simple=simple, **kw)
    ours = instruct_pipe(PROMPT, cond_image, instruction, negative_prompt=NEGATIVE, scale=kw["scale"],
                         guidance_scale=kw["g"], instruct_guidance_scale=kw["gi"], image_guidance_scale=kw["gimg"],
                         num_inference_steps=STEPS, seed=kw["seed"], output_type="latent")
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_instruction_changes_the_image(instruct_pipe, cond_image):
    a, b = (instruct_pipe(PROMPT, cond_image, text, scale=1.0, num_inference_steps=STEPS, seed=3,
                          guidance_mode="full", output_type="latent")
            for text in ("take the object", "keep the composition"))
    assert (a - b).abs().max() > 1e-3
