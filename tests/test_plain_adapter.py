"""Plain IP-Adapter (`ip-adapter_sd15.bin`'s layout: a Linear + LayerNorm from CLIP's pooled, projected image
embedding to 4 tokens) loads and matches diffusers' own `load_ip_adapter` on the same tiny weights; zeros (not the
zero image) are its unconditional embedding, as in diffusers; scale 0 is the base model."""
import pytest
import torch

from conftest import NEGATIVE, PROMPT
from ipadapter_instruct.engine.errors import EngineError

STEPS = 4


@pytest.fixture(scope="module")
def plain_dir(tiny, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    from ipadapter_instruct.engine.tiny import tiny_adapter
    folder = tmp_path_factory.mktemp("plain")
    torch.manual_seed(3)
    tiny_adapter(str(folder / "plain.safetensors"), UNet2DConditionModel.from_pretrained(tiny["model"],
                                                                                          subfolder="unet"),
                 kind="plain")
    return folder


@pytest.fixture(scope="module")
def plain_pipe(tiny, plain_dir):
    from ipadapter_instruct.engine import Pipeline
    pipe = Pipeline.from_pretrained(tiny["model"], image_encoder=tiny["image_encoder"],
                                    adapter=str(plain_dir / "plain.safetensors"), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_plain_adapter_matches_diffusers(tiny, plain_dir, plain_pipe, cond_image):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPVisionModelWithProjection

    from ipadapter_instruct.engine.loading import _image_processor_class

    d = StableDiffusionPipeline.from_pretrained(
        tiny["model"], safety_checker=None, requires_safety_checker=False,
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(tiny["image_encoder"]),
        feature_extractor=_image_processor_class().from_pretrained(tiny["image_encoder"]))
    d.load_ip_adapter(str(plain_dir), subfolder="", weight_name="plain.safetensors", image_encoder_folder=None)
    d.set_progress_bar_config(disable=True)
    assert plain_pipe.adapter.kind == "plain"
    for scale in (0.6, 1.0):
        d.set_ip_adapter_scale(scale)
        want = d(PROMPT, negative_prompt=NEGATIVE, ip_adapter_image=cond_image, num_inference_steps=STEPS,
                 guidance_scale=6.0, generator=torch.Generator("cpu").manual_seed(7), output_type="latent").images
        got = plain_pipe(PROMPT, cond_image, negative_prompt=NEGATIVE, scale=scale, num_inference_steps=STEPS,
                         seed=7, output_type="latent")
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    zero = plain_pipe(PROMPT, cond_image, negative_prompt=NEGATIVE, scale=0.0, num_inference_steps=STEPS, seed=7,
                      output_type="latent")
    assert (zero - got).abs().max() > 1e-3  # the adapter matters
    # from a photo: diffusers' img2img pipeline on the same modules (its adapter loaded above)
    from diffusers import StableDiffusionImg2ImgPipeline
    i2i = StableDiffusionImg2ImgPipeline(**d.components)
    i2i.set_progress_bar_config(disable=True)
    photo = cond_image.transpose(0)  # (any other picture)
    want = i2i(PROMPT, image=photo, strength=0.7, negative_prompt=NEGATIVE, ip_adapter_image=cond_image,
               num_inference_steps=STEPS, guidance_scale=6.0, generator=torch.Generator("cpu").manual_seed(7),
               output_type="latent").images
    got = plain_pipe(PROMPT, cond_image, negative_prompt=NEGATIVE, scale=1.0, num_inference_steps=STEPS, seed=7,
                     init_image=photo, strength=0.7, output_type="latent")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_plain_adapter_is_refused_where_it_is_not_built(tiny, plain_dir):
    from ipadapter_instruct.export.onnx import export_onnx
    from ipadapter_instruct.train.model import init_adapter
    from diffusers import UNet2DConditionModel

    with pytest.raises(EngineError, match="plain IP-Adapter .* is not exported yet"):
        export_onnx(tiny["model"], tiny["image_encoder"], str(plain_dir / "plain.safetensors"), "unused",
                    log=lambda *a: None)
    unet = UNet2DConditionModel.from_pretrained(tiny["model"], subfolder="unet")
    with pytest.raises(EngineError, match="plain IP-Adapter .*--init-adapter takes"):
        init_adapter(unet, 48, 32, str(plain_dir / "plain.safetensors"))
