"""The command line's names, defaults and seeds (issue 28): --num-inference-steps, --num-images-per-prompt and
--ip-adapter-image with the old flags as aliases; the defaults are the Python API's and --help shows them; no --seed
draws one, printed, and each PNG carries its parameters (Automatic1111's "parameters" chunk) whose seed gives the
image back."""
import inspect
import re

import numpy as np
import pytest
from PIL import Image

from ipadapter_instruct.engine.__main__ import build_parser, main
from ipadapter_instruct.engine.pnginfo import parameters_text, png_bytes, pnginfo


def parse(*argv):
    return build_parser().parse_args(list(argv))


GENERATE = ["generate", "--model", "m", "--out", "o.png"]
EDIT = ["edit", "--model", "m", "--image", "p.png", "--prompt", "make it winter", "--out", "o.png"]


@pytest.mark.parametrize("new,old,dest,value,want", [
    ("--num-inference-steps", "--steps", "steps", "3", 3),
    ("--num-images-per-prompt", "--num-images", "num_images", "2", 2),
    ("--ip-adapter-image", "--image", "image", "ref.png", ["ref.png"]),
])
def test_generate_flags_and_their_aliases(new, old, dest, value, want):
    assert getattr(parse(*GENERATE, new, value), dest) == getattr(parse(*GENERATE, old, value), dest) == want


def test_edit_flags_and_their_aliases():
    for flag in ("--ip-adapter-image", "--adapter-image"):
        a = parse(*EDIT, flag, "ref.png", "--num-inference-steps", "4", "--num-images-per-prompt", "2")
        assert (a.adapter_image, a.image, a.steps, a.num_images) == ("ref.png", "p.png", 4, 2)


def test_defaults_are_the_python_api_s():
    from ipadapter_instruct.engine import EditPipeline, Pipeline
    for argv, cls in ((GENERATE, Pipeline), (EDIT, EditPipeline)):
        a, api = parse(*argv), inspect.signature(cls.__call__).parameters
        cli = dict(num_inference_steps=a.steps, num_images_per_prompt=a.num_images, seed=a.seed,
                   guidance_scale=a.guidance_scale, image_guidance_scale=a.image_guidance_scale,
                   negative_prompt=a.negative_prompt, scheduler=None if a.scheduler == "default" else a.scheduler)
        if cls is Pipeline:
            cli.update(instruct_guidance_scale=a.instruct_guidance_scale, guidance_mode=a.guidance_mode)
        else:
            cli["scale"] = a.scale
        assert cli == {k: api[k].default for k in cli}, cls.__name__


@pytest.mark.parametrize("command,shown", [
    ("generate", ["(default: 30)", "(default: 6.0)", "(default: 1.0)", "(default: auto)", "(default: 1)"]),
    ("edit", ["(default: 100)", "(default: 7.5)", "(default: 1.5)", "(default: 0.8)"]),
])
def test_help_shows_the_defaults(capsys, command, shown):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # (argparse wraps lines)
    for text in shown:
        assert text in out, text
    assert "--num-inference-steps N, --steps N" in out


def test_text_only_needs_a_prompt(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", tiny["model"], "--out", str(tmp_path / "o.png")])
    assert e.value.code == 2
    assert "--prompt" in capsys.readouterr().err


def test_parameters_text_is_automatic1111_s():
    text = parameters_text(dict(prompt="a red house", negative_prompt="blurry", num_inference_steps=20,
                                scheduler="euler_a", guidance_scale=6.0, seed=1234, width=512, height=768,
                                model="sd15", instruct="use the style, loosely", scale=0.8))
    assert text == ("a red house\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 6.0, Seed: 1234, "
                    "Size: 512x768, Model: sd15, Instruct: \"use the style, loosely\", IP-Adapter scale: 0.8")
    assert parameters_text(dict(prompt="a cat", negative_prompt="", seed=1)) == "a cat\nSeed: 1"
    image = Image.new("RGB", (8, 8))
    assert pnginfo({"prompt": "p", "seed": 2}).chunks  # a PngInfo with a text chunk
    with Image.open(__import__("io").BytesIO(png_bytes(image, {"prompt": "p", "seed": 2}))) as im:
        assert im.text["parameters"] == "p\nSeed: 2"


def test_no_seed_is_drawn_printed_and_written(tiny, tmp_path, capsys, instruct_pipe, cond_image):
    ref = tmp_path / "cond.png"
    cond_image.save(ref)
    args = ["generate", "--model", tiny["model"], "--image-encoder", tiny["image_encoder"], "--adapter",
            tiny["adapter"], "--ip-adapter-image", str(ref), "--prompt", "a cat", "--negative-prompt", "blurry",
            "--instruct", "take the object", "--num-inference-steps", "2", "--num-images-per-prompt", "2",
            "--no-progress", "--out", str(tmp_path / "out.png")]
    assert main(args) == 0
    out, err = capsys.readouterr()
    paths = out.split()
    seeds = [int(s) for s in re.fullmatch(r"seeds: (\d+) (\d+)", err.strip().splitlines()[-1]).groups()]
    assert seeds[1] == seeds[0] + 1
    for path, seed in zip(paths, seeds):
        with Image.open(path) as im:
            text, got = im.text["parameters"], np.asarray(im.convert("RGB"))
        lines = text.splitlines()
        assert lines[:2] == ["a cat", "Negative prompt: blurry"]
        assert f"Seed: {seed}," in lines[2] and "Steps: 2," in lines[2] and "Size: 64x64" in lines[2]
        assert "Instruct: take the object" in lines[2] and "IP-Adapter scale: 0.8" in lines[2]
        written = int(re.search(r"Seed: (\d+)", text).group(1))
        want = instruct_pipe("a cat", cond_image, "take the object", "blurry", num_inference_steps=2, seed=written)
        assert np.abs(np.asarray(want[0], int) - got.astype(int)).max() <= 1  # (one grey level across batch shapes)
