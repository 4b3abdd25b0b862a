"""ControlNet img2img and inpainting (engine/controlnet.py over engine/img2img.py) against diffusers'
StableDiffusionControlNetImg2ImgPipeline and StableDiffusionControlNetInpaintPipeline on tiny weights, the control
image apart from the photo: latents within 1e-4 at their default strengths (0.8, 1.0) and another, with a guidance
window and guess mode, with an IP-Adapter+ image; the net reads the 4-channel latents (a 4-channel ControlNet drives
a 9-channel inpainting UNet, as diffusers runs it); the output is the photo's size, inpainting included, as those
pipelines make it; and SDXL's ControlNet img2img (StableDiffusionXLControlNetImg2ImgPipeline, default strength 0.8)."""
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import NEGATIVE, PROMPT, fly

STEPS = 4
# diffusers' default controlnet_conditioning_scale per pipeline (its text-to-image ones: 1.0, the engine's default for
# every task; a comparison at a pipeline's default passes it to the engine)
SCALE = {"img2img": 0.8, "inpaint": 0.5, "sdxl-img2img": 0.8}


@pytest.fixture(scope="module")
def net(tiny, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    from ipadapter_instruct.engine.tiny_parts import tiny_controlnet
    unet = UNet2DConditionModel.from_pretrained(tiny["model"], subfolder="unet")
    return tiny_controlnet(str(tmp_path_factory.mktemp("cn-i2i") / "net"), unet, 0)


@pytest.fixture(scope="module")
def images():
    g = np.random.RandomState(2)
    photo = Image.fromarray((g.rand(48, 64, 3) * 255).astype("uint8"))  # 64 wide, 48 high: not the native size
    control = Image.fromarray((g.rand(48, 64, 3) * 255).astype("uint8"))
    mask = Image.new("L", photo.size, 0)
    ImageDraw.Draw(mask).rectangle((4, 8, 44, 40), fill=255)
    return photo, control, mask


def engine(model, net, plus=None, image_encoder=None):
    from ipadapter_instruct.engine import Pipeline
    extra = dict(image_encoder=image_encoder, adapter=str(plus)) if plus else {}
    pipe = Pipeline.from_pretrained(model, device="cpu", controlnet=net, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(cls_name, model, net, plus=None, image_encoder=None):
    import diffusers
    from diffusers import ControlNetModel
    from transformers import CLIPVisionModelWithProjection

    from ipadapter_instruct.engine.loading import _image_processor_class
    extra = {}
    if plus is not None:
        extra = dict(image_encoder=CLIPVisionModelWithProjection.from_pretrained(image_encoder),
                     feature_extractor=_image_processor_class().from_pretrained(image_encoder))
    d = getattr(diffusers, cls_name).from_pretrained(model, controlnet=ControlNetModel.from_pretrained(net),
                                                     safety_checker=None, requires_safety_checker=False, **extra)
    if plus is not None:
        d.load_ip_adapter(str(plus.parent), subfolder="", weight_name=plus.name, image_encoder_folder=None)
        d.set_ip_adapter_scale(0.7)
    d.set_progress_bar_config(disable=True)
    return d


def theirs(d, images, mask=False, seed=1, **kw):
    photo, control, m = images
    extra = dict(mask_image=m) if mask else {}
    return d(PROMPT, image=photo, control_image=control, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
             guidance_scale=6.0, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", **extra,
             **kw).images


def ours(pipe, images, mask=False, seed=1, strength=None, cond=None, **kw):
    photo, control, m = images
    extra = dict(scale=0.7) if cond is not None else {}
    return pipe(PROMPT, cond, negative_prompt=NEGATIVE, init_image=photo, mask_image=m if mask else None,
                strength=strength, control_image=control, num_inference_steps=STEPS, guidance_scale=6.0, seed=seed,
                output_type="latent", **extra, **kw)


CASES = {"default": {}, "strength-0.5": dict(strength=0.5),
         "window": dict(strength=0.75, controlnet_conditioning_scale=0.6, control_guidance_start=0.25,
                        control_guidance_end=0.75),
         "guess": dict(guess_mode=True, controlnet_conditioning_scale=0.8)}


@pytest.mark.parametrize("case", CASES)
def test_controlnet_img2img_matches_diffusers(tiny, net, images, case):
    kw = CASES[case]
    pipe = engine(tiny["model"], net)
    got = ours(pipe, images, **{"controlnet_conditioning_scale": SCALE["img2img"], **kw})
    assert got.shape[-2:] == (12, 16)  # the photo's size over the VAE factor 4
    torch.testing.assert_close(got, theirs(reference("StableDiffusionControlNetImg2ImgPipeline", tiny["model"], net),
                                           images, **kw), atol=1e-4, rtol=1e-4)
    off = ours(pipe, images, **dict(kw, controlnet_conditioning_scale=0.0))
    assert (got - off).abs().max() > 1e-3  # the net acts


def test_controlnet_img2img_with_an_ip_adapter_plus_image(tiny, net, images, plus_dir, cond_image):
    plus = plus_dir / "plus.safetensors"
    d = reference("StableDiffusionControlNetImg2ImgPipeline", tiny["model"], net, plus, tiny["image_encoder"])
    pipe = engine(tiny["model"], net, plus, tiny["image_encoder"])
    torch.testing.assert_close(ours(pipe, images, strength=0.6, cond=cond_image,
                                    controlnet_conditioning_scale=SCALE["img2img"]),
                               theirs(d, images, strength=0.6, ip_adapter_image=cond_image), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["default", "strength-0.5", "guess"])
def test_controlnet_inpaint_4_channels_matches_diffusers(tiny, net, images, case):
    kw = CASES[case]
    got = ours(engine(tiny["model"], net), images, mask=True,
               **{"controlnet_conditioning_scale": SCALE["inpaint"], **kw})
    assert got.shape[-2:] == (12, 16)  # the photo's size: diffusers' ControlNet inpaint pipeline takes it
    want = theirs(reference("StableDiffusionControlNetInpaintPipeline", tiny["model"], net), images, mask=True, **kw)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def inpainting_model(tmp_path_factory):
    from ipadapter_instruct.engine.tiny import make_tiny
    return make_tiny(str(tmp_path_factory.mktemp("cn-inpaint") / "weights"), inpaint=True)["model"]


@pytest.mark.parametrize("case", ["default", "strength-0.5"])
def test_a_4_channel_controlnet_drives_a_9_channel_inpainting_unet(inpainting_model, net, images, case):
    """The ControlNet reads the latents alone (4 channels), the UNet the latents, mask and masked photo (9): as
    diffusers' ControlNet inpaint pipeline runs an SD1.5 ControlNet beside the SD1.5 inpainting UNet."""
    kw = CASES[case]
    pipe = engine(inpainting_model, net)
    assert pipe.unet.config.in_channels == 9 and pipe.controlnets[0].config.in_channels == 4
    want = theirs(reference("StableDiffusionControlNetInpaintPipeline", inpainting_model, net), images, mask=True,
                  **kw)
    got = ours(pipe, images, mask=True, **{"controlnet_conditioning_scale": SCALE["inpaint"], **kw})
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_controlnet_flights_from_photos_equal_each_alone(tiny, net, images):
    """Step-level batching: ControlNet img2img and inpainting flights with their own strengths, control images and
    windows, joining mid-flight, equal each call alone."""
    photo, control, mask = images
    pipe = engine(tiny["model"], net)
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, output_type="latent")
    reqs = [dict(base, seed=1, init_image=photo, control_image=control, strength=0.75),
            dict(base, seed=2, init_image=photo, control_image=control.transpose(Image.FLIP_LEFT_RIGHT), strength=0.5,
                 control_guidance_start=0.5),
            dict(base, seed=3, init_image=photo, mask_image=mask, control_image=control, guess_mode=True)]
    wants = [pipe(**r) for r in reqs]
    out = fly(pipe, reqs, {0: [0], 1: [1, 2]})
    for i, want in enumerate(wants):
        torch.testing.assert_close(out[i], want, atol=1e-4, rtol=1e-4, msg=lambda m, i=i: f"flight {i}: {m}")


def test_sdxl_controlnet_img2img_matches_diffusers(tmp_path_factory, images):
    """StableDiffusionXLControlNetImg2ImgPipeline with IP-Adapter+ SDXL: its default strength is 0.8 (not the SDXL
    img2img pipeline's 0.3), the net reads the added conditioning per row."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetImg2ImgPipeline
    from transformers import CLIPVisionModelWithProjection

    from ipadapter_instruct.engine.loading import _image_processor_class
    from ipadapter_instruct.engine.tiny import make_tiny_sdxl
    paths = make_tiny_sdxl(str(tmp_path_factory.mktemp("sdxl-cn-i2i") / "tiny"), controlnet=True)
    d = StableDiffusionXLControlNetImg2ImgPipeline.from_pretrained(
        paths["model"], controlnet=ControlNetModel.from_pretrained(paths["controlnet"]),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(paths["image_encoder"]),
        feature_extractor=_image_processor_class().from_pretrained(paths["image_encoder"]))
    d.load_ip_adapter(os.path.dirname(paths["adapter"]), subfolder="", weight_name=os.path.basename(paths["adapter"]),
                      image_encoder_folder=None)
    d.set_ip_adapter_scale(0.7)
    d.set_progress_bar_config(disable=True)
    pipe = engine(paths["model"], paths["controlnet"], paths["adapter"], paths["image_encoder"])
    assert pipe.STRENGTH["img2img"] == 0.8
    cond = images[1].transpose(Image.FLIP_TOP_BOTTOM)
    for kw in ({}, dict(strength=0.5, controlnet_conditioning_scale=0.7, control_guidance_end=0.75)):
        want = theirs(d, images, ip_adapter_image=cond, original_size=(96, 80), **kw)
        got = ours(pipe, images, cond=cond, original_size=(96, 80),
                   **{"controlnet_conditioning_scale": SCALE["sdxl-img2img"], **kw})
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
