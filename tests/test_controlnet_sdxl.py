"""ControlNet on SDXL (engine/controlnet.py with engine/sdxl.py) against diffusers' StableDiffusionXLControlNetPipeline
with load_ip_adapter (IP-Adapter+ SDXL) on the same tiny weights: an SDXL ControlNet reads each row's pooled text
embedding and time ids as the UNet does; plain, with a conditioning scale and a guidance window, and in guess mode,
with size conditioning; scale 0 is no ControlNet, bitwise."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

STEPS = 4
PROMPT, NEG = "a red house by a lake", "blurry"


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    import json

    from ipadapter_instruct.engine.tiny import make_tiny_sdxl
    paths = make_tiny_sdxl(str(tmp_path_factory.mktemp("sdxl-controlnet") / "tiny"), controlnet=True)
    with open(os.path.join(paths["controlnet"], "config.json")) as fh:  # an SDXL ControlNet: reads the added cond.
        assert json.load(fh)["addition_embed_type"] == "text_time"
    return paths


@pytest.fixture(scope="module")
def images():
    g = np.random.RandomState(1)
    return [Image.fromarray((g.rand(64, 64, 3) * 255).astype("uint8")) for _ in range(2)]


@pytest.fixture(scope="module")
def ours(sdxl):
    from ipadapter_instruct.engine import Pipeline
    from ipadapter_instruct.engine.sdxl import SDXLPipeline
    pipe = Pipeline.from_pretrained(sdxl["model"], image_encoder=sdxl["image_encoder"], adapter=sdxl["adapter"],
                                    controlnet=sdxl["controlnet"], device="cpu")
    assert isinstance(pipe, SDXLPipeline) and len(pipe.controlnets) == 1
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def theirs(sdxl):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
    from transformers import CLIPVisionModelWithProjection

    from ipadapter_instruct.engine.loading import _image_processor_class
    d = StableDiffusionXLControlNetPipeline.from_pretrained(
        sdxl["model"], controlnet=ControlNetModel.from_pretrained(sdxl["controlnet"]),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(sdxl["image_encoder"]),
        feature_extractor=_image_processor_class().from_pretrained(sdxl["image_encoder"]))
    d.load_ip_adapter(os.path.dirname(sdxl["adapter"]), subfolder="", weight_name=os.path.basename(sdxl["adapter"]),
                      image_encoder_folder=None)
    d.set_progress_bar_config(disable=True)
    return d


CASES = {"plain": {}, "scale-window": dict(controlnet_conditioning_scale=0.7, control_guidance_start=0.25,
                                           control_guidance_end=0.75),
         "guess": dict(guess_mode=True, controlnet_conditioning_scale=0.8)}


@pytest.mark.parametrize("case", CASES)
def test_sdxl_controlnet_matches_diffusers(ours, theirs, images, case):
    kw = CASES[case]
    cond, control = images
    theirs.set_ip_adapter_scale(0.6)
    want = theirs(PROMPT, image=control, negative_prompt=NEG, ip_adapter_image=cond, num_inference_steps=STEPS,
                  guidance_scale=6.0, generator=torch.Generator("cpu").manual_seed(1), output_type="latent",
                  original_size=(96, 80), **kw).images
    got = ours(PROMPT, cond, negative_prompt=NEG, scale=0.6, control_image=control, num_inference_steps=STEPS,
               guidance_scale=6.0, seed=1, output_type="latent", original_size=(96, 80), **kw)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    without = ours(PROMPT, cond, negative_prompt=NEG, scale=0.6, control_image=control, num_inference_steps=STEPS,
                   guidance_scale=6.0, seed=1, output_type="latent", original_size=(96, 80),
                   controlnet_conditioning_scale=0.0)
    assert (got - without).abs().max() > 1e-3  # the ControlNet acts, or the comparison proves nothing


def test_sdxl_controlnet_scale_zero_is_no_controlnet(sdxl, ours, images):
    from ipadapter_instruct.engine import Pipeline
    base = Pipeline.from_pretrained(sdxl["model"], image_encoder=sdxl["image_encoder"], adapter=sdxl["adapter"],
                                    device="cpu")
    base.set_progress_bar_config(disable=True)
    kw = dict(negative_prompt=NEG, scale=0.6, num_inference_steps=STEPS, seed=1, output_type="latent")
    assert torch.equal(ours(PROMPT, images[0], control_image=images[1], controlnet_conditioning_scale=0.0, **kw),
                       base(PROMPT, images[0], **kw))
