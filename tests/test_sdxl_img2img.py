"""SDXL img2img and inpainting (engine/sdxl.py over engine/img2img.py) against diffusers' StableDiffusionXLImg2ImgPipeline
and StableDiffusionXLInpaintPipeline with load_ip_adapter (IP-Adapter+ SDXL) on tiny weights: latents within 1e-4 at
two strengths and their defaults (0.3 and 0.9999), 4-channel and 9-channel inpainting; the output size rules (img2img:
the photo's; inpainting: the native size); a model whose model_index.json sets requires_aesthetics_score reads
the aesthetic scores in its time ids; a VAE with latents_mean/latents_std normalises the photo's latent and undoes it
when decoding, as diffusers; force_upcast encodes in float32; step-level flights starting from photos equal each
call alone."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import fly
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.prepared import CallState

STEPS = 4
PROMPT, NEG = "a cat", "blurry, low quality"


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from ipadapter_instruct.engine.tiny import make_tiny_sdxl
    return make_tiny_sdxl(str(tmp_path_factory.mktemp("sdxl-i2i") / "tiny"))


def variant(sdxl, folder, seed: int = 7, **kind) -> dict:
    """A tiny SDXL base of another kind (tiny_sdxl_base: inpaint, aesthetic) with its own IP-Adapter+ file; the image
    encoder is the shared one."""
    from diffusers import UNet2DConditionModel

    from ipadapter_instruct.engine.tiny import tiny_adapter, tiny_sdxl_base
    torch.manual_seed(seed)
    tiny_sdxl_base(str(folder / "model"), **kind)
    unet = UNet2DConditionModel.from_pretrained(str(folder / "model"), subfolder="unet")
    tiny_adapter(str(folder / "plus.safetensors"), unet, kind="plus")
    return dict(sdxl, model=str(folder / "model"), adapter=str(folder / "plus.safetensors"))


def ours_pipe(paths):
    from conftest import load_pipe
    return load_pipe(paths, paths["adapter"])


def theirs_pipe(paths, cls_name: str):
    import diffusers
    from transformers import CLIPVisionModelWithProjection

    from ipadapter_instruct.engine.loading import _image_processor_class
    d = getattr(diffusers, cls_name).from_pretrained(
        paths["model"], image_encoder=CLIPVisionModelWithProjection.from_pretrained(paths["image_encoder"]),
        feature_extractor=_image_processor_class().from_pretrained(paths["image_encoder"]))
    d.load_ip_adapter(os.path.dirname(paths["adapter"]), subfolder="", weight_name=os.path.basename(paths["adapter"]),
                      image_encoder_folder=None)
    d.set_progress_bar_config(disable=True)
    return d


@pytest.fixture(scope="module")
def pipe(sdxl):
    return ours_pipe(sdxl)


@pytest.fixture(scope="module")
def img2img(sdxl):
    return theirs_pipe(sdxl, "StableDiffusionXLImg2ImgPipeline")


@pytest.fixture(scope="module")
def inpaint(sdxl):
    return theirs_pipe(sdxl, "StableDiffusionXLInpaintPipeline")


@pytest.fixture(scope="module")
def images():
    g = np.random.RandomState(0)
    cond = Image.fromarray((g.rand(64, 64, 3) * 255).astype("uint8"))
    photo = Image.fromarray((g.rand(48, 64, 3) * 255).astype("uint8"))  # 64 wide, 48 high: not the native 64 x 64
    mask = Image.new("L", photo.size, 0)
    ImageDraw.Draw(mask).rectangle((8, 12, 40, 36), fill=255)  # white: repaint
    return cond, photo, mask


def theirs(d, images, strength=None, mask=False, seed=3, output_type="latent", **kw):
    cond, photo, m = images
    d.set_ip_adapter_scale(0.7)
    extra = {} if strength is None else {"strength": strength}
    if mask:
        extra["mask_image"] = m
    return d(PROMPT, image=photo, negative_prompt=NEG, ip_adapter_image=cond, guidance_scale=6.0,
             num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(seed), output_type=output_type,
             **extra, **kw).images


def ours(p, images, strength=None, mask=False, seed=3, output_type="latent", **kw):
    cond, photo, m = images
    return p(PROMPT, cond, negative_prompt=NEG, scale=0.7, guidance_scale=6.0, num_inference_steps=STEPS, seed=seed,
             output_type=output_type, init_image=photo, strength=strength, mask_image=m if mask else None, **kw)


@pytest.mark.parametrize("strength", [None, 0.5, 0.75], ids=["default-0.3", "0.5", "0.75"])
def test_img2img_matches_diffusers(pipe, img2img, images, strength):
    want = theirs(img2img, images, strength)
    got = ours(pipe, images, strength)
    assert got.shape[-2:] == (12, 16)  # the photo's size (48 x 64) over the VAE factor 4, as diffusers
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - ours(pipe, images, strength, seed=4)).abs().max() > 1e-3  # the noise acts


def test_img2img_png_and_size_conditioning(pipe, img2img, images):
    kw = dict(original_size=(96, 80), crops_coords_top_left=(4, 8))
    want = theirs(img2img, images, 0.5, output_type="pil", **kw)[0]
    got = ours(pipe, images, 0.5, output_type="pil", **kw)[0]
    assert got.size == (64, 48)
    assert np.abs(np.asarray(got, int) - np.asarray(want, int)).max() <= 1


@pytest.mark.parametrize("strength", [None, 0.6, 1.0], ids=["default-0.9999", "0.6", "1.0"])
def test_inpaint_4_channels_matches_diffusers(pipe, inpaint, images, strength):
    want = theirs(inpaint, images, strength, mask=True)
    got = ours(pipe, images, strength, mask=True)
    assert got.shape[-2:] == (16, 16)  # the native size, as diffusers' inpaint pipeline
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_default_strengths_are_diffusers(pipe):
    assert pipe.STRENGTH == {"img2img": 0.3, "inpaint": 0.9999}


@pytest.fixture(scope="module")
def nine(sdxl, tmp_path_factory):
    return variant(sdxl, tmp_path_factory.mktemp("sdxl-inpaint"), inpaint=True)


@pytest.mark.parametrize("strength", [None, 1.0], ids=["default-0.9999", "1.0"])
def test_inpaint_9_channels_matches_diffusers(nine, images, strength):
    p = ours_pipe(nine)
    assert p.unet.config.in_channels == 9
    torch.testing.assert_close(ours(p, images, strength, mask=True),
                               theirs(theirs_pipe(nine, "StableDiffusionXLInpaintPipeline"), images, strength,
                                      mask=True), atol=1e-4, rtol=1e-4)
    with pytest.raises(EngineError, match="mask_image is required: this is an inpainting model"):
        ours(p, images, 0.5)


@pytest.fixture(scope="module")
def aesthetic(sdxl, tmp_path_factory):
    return variant(sdxl, tmp_path_factory.mktemp("sdxl-aesthetic"), aesthetic=True)


@pytest.mark.parametrize("cls_name,mask", [("StableDiffusionXLImg2ImgPipeline", False),
                                           ("StableDiffusionXLInpaintPipeline", True)], ids=["img2img", "inpaint"])
def test_aesthetic_score_where_the_model_asks(aesthetic, images, cls_name, mask):
    """model_index.json's requires_aesthetics_score (read at load): the time ids end in the aesthetic score (6.0;
    2.5 on the unconditional rows) in place of target_size, as diffusers' pipelines build them."""
    p = ours_pipe(aesthetic)
    assert p.requires_aesthetics_score
    d = theirs_pipe(aesthetic, cls_name)
    assert d.config.requires_aesthetics_score
    torch.testing.assert_close(ours(p, images, 0.5, mask=mask), theirs(d, images, 0.5, mask=mask), atol=1e-4,
                               rtol=1e-4)
    args = dict(p.call_defaults(), prompt=PROMPT, image=images[0], negative_prompt=NEG, num_inference_steps=STEPS)
    time_ids = p.prepare(p.parse(args), args, CallState()).added["time_ids"]
    assert time_ids.shape[1] == 5 and sorted(time_ids[:, -1].tolist()) == [2.5, 6.0]


def test_time_ids_misfit_is_one_line(aesthetic, tmp_path):
    """A 5-time-id UNet in a folder without requires_aesthetics_score (and the reverse) is one line naming it."""
    from ipadapter_instruct.engine import Pipeline
    folder = tmp_path / "model"
    shutil.copytree(aesthetic["model"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    index.pop("requires_aesthetics_score")
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(EngineError, match="5 time ids .*should set requires_aesthetics_score"):
        Pipeline.from_pretrained(str(folder), device="cpu")


def test_latents_mean_and_std_as_diffusers(sdxl, images, tmp_path):
    """A VAE config with latents_mean/latents_std (as Playground v2.5's): the photo's latent is normalised by them
    (StableDiffusionXLImg2ImgPipeline) and decoding undoes it (every SDXL pipeline): latents and PNG as diffusers."""
    folder = tmp_path / "model"
    shutil.copytree(sdxl["model"], folder)
    cfg = json.loads((folder / "vae" / "config.json").read_text())
    cfg.update(latents_mean=[0.1, -0.2, 0.3, 0.05], latents_std=[0.9, 1.2, 0.7, 1.1])
    (folder / "vae" / "config.json").write_text(json.dumps(cfg))
    paths = dict(sdxl, model=str(folder))
    p, d = ours_pipe(paths), theirs_pipe(paths, "StableDiffusionXLImg2ImgPipeline")
    got = ours(p, images, 0.5)
    torch.testing.assert_close(got, theirs(d, images, 0.5), atol=1e-4, rtol=1e-4)
    plain = ours_pipe(sdxl)
    assert (got - ours(plain, images, 0.5)).abs().max() > 1e-3  # the statistics act
    want = theirs(d, images, 0.5, output_type="pil")[0]
    assert np.abs(np.asarray(ours(p, images, 0.5, output_type="pil")[0], int) - np.asarray(want, int)).max() <= 1


def test_force_upcast_encodes_in_float32(sdxl, images):
    """force_upcast (SDXL's VAE overflows in float16): a bfloat16 pipeline encodes the photo with its VAE in float32,
    as diffusers casts it for the encode, and leaves its own VAE in bfloat16."""
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor

    from ipadapter_instruct.engine import Pipeline
    p = Pipeline.from_pretrained(sdxl["model"], device="cpu", dtype="bfloat16")
    assert p.vae.config.force_upcast
    pixels = VaeImageProcessor(vae_scale_factor=4).preprocess(images[1]).to(torch.bfloat16)
    got = p.photo_distribution(pixels)
    vae = AutoencoderKL.from_pretrained(sdxl["model"], subfolder="vae", torch_dtype=torch.bfloat16).float()
    assert got.mean.dtype == torch.float32 and p.vae.dtype == torch.bfloat16
    torch.testing.assert_close(got.mean, vae.encode(pixels.float()).latent_dist.mean, atol=0, rtol=0)
    assert p.photo_latents(got.mean).dtype == torch.bfloat16


def test_flights_from_photos_equal_each_alone(pipe, images):
    """Step-level batching: img2img and inpainting flights (their own strengths, so their own cut schedules) and a
    text-to-image one joining mid-flight each give what their call gives alone."""
    cond, photo, mask = images
    base = dict(prompt=PROMPT, image=cond, negative_prompt=NEG, scale=0.7, num_inference_steps=STEPS,
                output_type="latent", height=48, width=64)
    reqs = [dict(base, seed=3, init_image=photo, strength=0.75),
            dict(base, seed=4, init_image=photo.transpose(Image.FLIP_LEFT_RIGHT), strength=0.5,
                 original_size=(96, 80)),
            dict(base, seed=5),
            dict(base, seed=6, init_image=photo, mask_image=mask, strength=0.6, scheduler="euler_a")]
    wants = [pipe(**r) for r in reqs]
    out = fly(pipe, reqs, {0: [0], 1: [1, 3], 2: [2]})
    for i, want in enumerate(wants):
        torch.testing.assert_close(out[i], want, atol=1e-4, rtol=1e-4, msg=lambda m, i=i: f"flight {i}: {m}")
