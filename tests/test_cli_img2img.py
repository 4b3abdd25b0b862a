"""`generate --init-image PATH --strength F [--mask PATH]` (issue 29): img2img and inpainting from the command line,
each image equal to the Python API's; the PNG records the strength as Automatic1111 writes it; every bad combination
is one line before torch loads; `make-tiny --inpaint` writes a 9-channel inpainting set whose parts fit; an
inpainting model is kind sd15 with `capabilities.inpaint`, and the other commands say how to run it."""
import os

import numpy as np
import pytest
from PIL import Image

from conftest import PROMPT
from ipadapter_instruct.engine.__main__ import main
from test_preflight import assert_light_one_line, probe


@pytest.fixture(scope="module")
def inpaint(tmp_path_factory):
    """A tiny inpainting set written by `make-tiny --inpaint` (with its ControlNet and LoRA)."""
    folder = tmp_path_factory.mktemp("inpaint") / "w"
    assert main(["make-tiny", str(folder), "--inpaint"]) == 0
    return {name: str(folder / rel) for name, rel in (("model", "model"), ("controlnet", "controlnet"),
                                                      ("lora", "lora.safetensors"), ("adapter", "adapter.safetensors"),
                                                      ("image_encoder", "image_encoder"))}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory, cond_image):
    root = tmp_path_factory.mktemp("pictures")
    photo = cond_image.resize((56, 40))
    mask = Image.new("L", photo.size, 0)
    mask.paste(255, (12, 8, 40, 32))
    photo.save(root / "photo.png")
    mask.save(root / "mask.png")
    cond_image.save(root / "square.png")
    Image.new("L", (64, 64), 255).save(root / "square-mask.png")
    Image.new("RGB", (4000, 400), "gray").save(root / "wide.png")
    return {"photo": str(root / "photo.png"), "mask": str(root / "mask.png"), "square": str(root / "square.png"),
            "square_mask": str(root / "square-mask.png"), "wide": str(root / "wide.png")}


def pipe_for(model, **kw):
    from ipadapter_instruct.engine import Pipeline
    pipe = Pipeline.from_pretrained(model, device="cpu", **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(capsys, *argv) -> tuple[np.ndarray, str, str]:
    """main(argv) must succeed -> (the image it wrote, its PNG parameters, stderr)."""
    out = argv[argv.index("--out") + 1]
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 0, err
    with Image.open(out) as im:
        return np.asarray(im.convert("RGB")), im.text["parameters"], err


def base(model, out, *more):
    return ["generate", "--model", model, "--prompt", PROMPT, "--steps", "4", "--seed", "3", "--no-progress",
            "--overwrite", "--out", str(out), *more]


def test_img2img_equals_the_api_and_records_its_strength(tiny, pictures, tmp_path, capsys):
    image, params, err = run(capsys, *base(tiny["model"], tmp_path / "a.png", "--init-image", pictures["photo"],
                                           "--strength", "0.6"))
    want = pipe_for(tiny["model"])(PROMPT, init_image=pictures["photo"], strength=0.6, num_inference_steps=4,
                                   seed=3)[0]
    assert image.shape == (40, 56, 3) and np.array_equal(image, np.asarray(want))  # the photo's size
    assert "Denoising strength: 0.6," in params and "Size: 56x40" in params, params
    assert err.strip().splitlines()[-1] == "seed: 3"
    _, params, _ = run(capsys, *base(tiny["model"], tmp_path / "b.png", "--init-image", pictures["photo"]))
    assert "Denoising strength: 0.8," in params  # img2img's default, as diffusers'
    _, params, _ = run(capsys, *base(tiny["model"], tmp_path / "c.png"))
    assert "Denoising strength" not in params


def test_inpainting_on_an_inpainting_model_and_on_a_4_channel_one(tiny, inpaint, pictures, tmp_path, capsys):
    for model, strength in ((inpaint["model"], None), (tiny["model"], 0.7)):
        more = ["--init-image", pictures["photo"], "--mask-image", pictures["mask"]]
        more += ["--strength", str(strength)] if strength else []
        image, params, _ = run(capsys, *base(model, tmp_path / "i.png", *more))
        want = pipe_for(model)(PROMPT, init_image=pictures["photo"], mask_image=pictures["mask"], strength=strength,
                               num_inference_steps=4, seed=3)[0]
        assert image.shape == (64, 64, 3) and np.array_equal(image, np.asarray(want)), model  # the native size
        assert f"Denoising strength: {strength or 1.0}," in params


def test_inpainting_with_the_sets_controlnet_lora_and_adapter(inpaint, pictures, tmp_path, capsys):
    """make-tiny --inpaint's ControlNet reads the 4 latent channels (as diffusers' ControlNet inpainting pipeline
    feeds it), its LoRA and adapter fit the 9-channel UNet."""
    more = ["--init-image", pictures["square"], "--mask", pictures["square_mask"], "--strength", "0.9",
            "--controlnet", inpaint["controlnet"], "--control-image", pictures["square"], "--lora",
            f"{inpaint['lora']}:0.5", "--adapter", inpaint["adapter"], "--image-encoder", inpaint["image_encoder"],
            "--ip-adapter-image", pictures["square"], "--instruct", "use the style of this image"]
    image, params, _ = run(capsys, *base(inpaint["model"], tmp_path / "all.png", *more))
    pipe = pipe_for(inpaint["model"], controlnet=inpaint["controlnet"], adapter=inpaint["adapter"],
                    image_encoder=inpaint["image_encoder"])
    pipe.load_lora_weights(inpaint["lora"], scale=0.5)
    want = pipe(PROMPT, init_image=pictures["square"], mask_image=pictures["square_mask"], strength=0.9,
                control_image=pictures["square"], image=pictures["square"], instruct="use the style of this image",
                num_inference_steps=4, seed=3)[0]
    assert np.array_equal(image, np.asarray(want))


def test_help_names_the_strength_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.8 img2img / 1.0 inpaint (diffusers' defaults))" in out
    assert "--mask PATH, --mask-image PATH" in out and "--init-image PATH" in out


@pytest.mark.parametrize("more, message", [
    (["--mask", "M"], "--mask needs --init-image (inpainting repaints a photo)"),
    (["--strength", "0.5"], "--strength needs --init-image"),
    (["--init-image", "P", "--strength", "0"], "--strength must be in (0, 1], got 0"),
    (["--init-image", "P", "--strength", "1.5"], "--strength must be in (0, 1], got 1.5"),
    (["--init-image", "P", "--strength", "nan"], "--strength must be in (0, 1], got nan"),
])
def test_flag_combinations_are_argument_errors(tiny, pictures, capsys, more, message):
    more = [{"M": pictures["mask"], "P": pictures["photo"]}.get(m, m) for m in more]
    with pytest.raises(SystemExit) as e:
        main(base(tiny["model"], "x.png", *more))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("model, more, message", [
    ("tiny", ["--init-image", "nowhere.png"], "init image (--init-image) not found: nowhere.png"),
    ("tiny", ["--init-image", "P", "--mask", "nowhere.png"], "mask (--mask) not found: nowhere.png"),
    ("tiny", ["--init-image", "P", "--mask", "SM"], "--mask is 64x64 but --init-image is 56x40"),
    ("tiny", ["--init-image", "W"], "size 400x4000 is over the maximum 256 px"),
    ("inpaint", [], "is an inpainting model (its UNet reads a mask and a masked photo): give --init-image PHOTO "
                    "and --mask MASK"),
    ("inpaint", ["--init-image", "P"], "is an inpainting model (its UNet reads a mask and a masked photo): give "
                                       "--init-image PHOTO and --mask MASK"),
])
def test_checked_before_torch_loads(tiny, inpaint, pictures, tmp_path, model, more, message):
    swap = {"P": pictures["photo"], "SM": pictures["square_mask"], "W": pictures["wide"]}
    path = {"tiny": tiny, "inpaint": inpaint}[model]["model"]
    args = base(path, tmp_path / "x.png", *[swap.get(m, m) for m in more])
    assert_light_one_line(probe("engine", *args), message)
    assert not os.path.exists(tmp_path / "x.png")


def test_a_controlnet_reading_the_mask_channels_does_not_fit(inpaint, pictures, tmp_path):
    """A ControlNet reads the latents alone: one made with a 9-channel input (ControlNetModel.from_unet of the
    inpainting UNet, unchanged) is refused from its config."""
    import json
    import shutil
    net = tmp_path / "net9"
    shutil.copytree(inpaint["controlnet"], net, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((net / "config.json").read_text())
    (net / "config.json").write_text(json.dumps({**config, "in_channels": 9}))
    args = base(inpaint["model"], tmp_path / "x.png", "--init-image", pictures["square"], "--mask",
                pictures["square_mask"], "--controlnet", str(net), "--control-image", pictures["square"])
    assert_light_one_line(probe("engine", *args), "does not fit this UNet: in_channels 9 against the UNet's 4 latent "
                                                  "channels")


def test_edit_and_serve_on_an_inpainting_model_point_to_generate(inpaint, pictures, tmp_path):
    hint = "is an inpainting model (its UNet reads the latents, a mask and the masked photo's latent), not an " \
           "InstructPix2Pix one: inpaint with Pipeline(init_image=, mask_image=) / `python -m engine generate " \
           "--init-image PHOTO --mask MASK`"
    edit = ("engine", "edit", "--model", inpaint["model"], "--image", pictures["photo"], "--prompt", "x", "--out",
            str(tmp_path / "x.png"))
    assert_light_one_line(probe(*edit), hint)
    assert_light_one_line(probe("engine", "serve", "--model", inpaint["model"], "--kind", "edit", "--port", "0"), hint)


def test_an_inpainting_model_is_kind_sd15_with_the_inpaint_capability(tiny, inpaint):
    from ipadapter_instruct.engine import EditPipeline, EngineError, Pipeline
    from ipadapter_instruct.engine.registry import EngineConfig, load_pipeline

    pipe = load_pipeline(EngineConfig(model=inpaint["model"], device="cpu"))
    assert type(pipe) is Pipeline and pipe.kind == "sd15" and pipe.capabilities.inpaint
    assert not pipe_for(tiny["model"]).capabilities.inpaint
    with pytest.raises(EngineError, match="is an inpainting model .* `python -m engine generate --init-image"):
        EditPipeline.from_pretrained(inpaint["model"], device="cpu")


def test_make_tiny_inpaint_writes_a_9_channel_model_and_refuses_what_does_not_combine(inpaint, tmp_path, capsys):
    import json
    with open(os.path.join(inpaint["model"], "unet", "config.json")) as fh:
        assert json.load(fh)["in_channels"] == 9
    with open(os.path.join(inpaint["model"], "model_index.json")) as fh:
        assert json.load(fh)["_class_name"] == "StableDiffusionInpaintPipeline"
    with open(os.path.join(inpaint["controlnet"], "config.json")) as fh:
        assert json.load(fh)["in_channels"] == 4  # the latents alone, as diffusers' ControlNet inpainting feeds it
    for flag, message in (("--edit", "make-tiny --inpaint writes an inpainting model (not with --edit)"),
                          ("--sdxl", "make-tiny --inpaint writes an SD1.5-layout inpainting model (not with --sdxl)")):
        assert main(["make-tiny", str(tmp_path / "w"), "--inpaint", flag]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: {message}", err
    assert not os.path.exists(tmp_path / "w")


def test_make_tiny_inpaint_single_file(tmp_path, capsys):
    from ipadapter_instruct.engine.single_file import checkpoint_kind, checkpoint_shapes
    assert main(["make-tiny", str(tmp_path / "w"), "--inpaint", "--single-file", "--no-controlnet",
                 "--no-lora"]) == 0
    path = str(tmp_path / "w" / "model.safetensors")
    assert f"single_file: {path}" in capsys.readouterr().out
    assert checkpoint_kind(path, checkpoint_shapes(path)) == "inpaint"
