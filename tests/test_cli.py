"""`python -m engine`: the exact CLI contract, one-line errors, and no output left behind on failure."""
import os
import subprocess
import sys

import pytest
from PIL import Image

from engine.__main__ import main


@pytest.fixture
def gen_args(tiny, tmp_path, cond_image):
    image = tmp_path / "cond.png"
    cond_image.save(image)
    return ["generate", "--model", tiny["model"], "--image-encoder", tiny["image_encoder"], "--adapter",
            tiny["adapter"], "--image", str(image), "--prompt", "a cat", "--negative-prompt", "blurry",
            "--instruct", "take the object", "--steps", "2", "--no-progress", "--out", str(tmp_path / "out.png")]


def test_generate_subprocess(gen_args, tmp_path):
    args = gen_args + ["--scale", "0.7", "--guidance-scale", "5", "--instruct-guidance-scale", "4",
                       "--image-guidance-scale", "1.5", "--guidance-mode", "full", "--seed", "3", "--height", "32",
                       "--width", "48", "--scheduler", "euler_a", "--device", "cpu", "--dtype", "float32"]
    done = subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "out.png") as im:
        assert im.size == (48, 32) and im.format == "PNG"


def test_several_images(gen_args, tmp_path, capsys):
    assert main(gen_args + ["--num-images", "2"]) == 0
    assert sorted(p.name for p in tmp_path.glob("out*.png")) == ["out-0.png", "out-1.png"]


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(("out", ".out")))


def set_arg(args, flag, value):
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


@pytest.mark.parametrize("flag,value,message,code", [
    ("--model", "/nonexistent/model", "base model not found", 1),
    ("--adapter", "CORRUPT", "cannot read adapter", 1),
    ("--image", "NOTANIMAGE", "cannot read condition image", 1),
    ("--image", "/nonexistent/cond.png", "condition image not found", 1),
    ("--instruct", "  ", "instruction is empty", 1),
    ("--steps", "0", "expected a positive integer, got 0", 2),
    ("--scheduler", "heun", "invalid choice: 'heun'", 2),
    ("--out", "OUT.jpg", "--out must name a .png file", 1),
])
def test_bad_input(gen_args, tmp_path, capsys, flag, value, message, code):
    if value == "CORRUPT":
        value = str(tmp_path / "corrupt.safetensors")
        open(value, "wb").write(b"garbage" * 20)
    if value == "NOTANIMAGE":
        value = str(tmp_path / "fake.png")
        open(value, "w").write("not a png")
    if value == "OUT.jpg":
        value = str(tmp_path / "out.jpg")
    args = set_arg(gen_args, flag, value)
    if code == 2:
        with pytest.raises(SystemExit) as ex:
            main(args)
        assert ex.value.code == code
    else:
        assert main(args) == code
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert leftovers(tmp_path) == []


def test_size_not_multiple_of_vae_factor(gen_args, tmp_path, capsys):
    assert main(gen_args + ["--height", "30"]) == 1
    err = capsys.readouterr().err.strip()
    assert "multiples of the VAE factor 4" in err and len(err.splitlines()) == 1
    assert leftovers(tmp_path) == []


def test_make_tiny_writes_real_formats(tmp_path, capsys):
    assert main(["make-tiny", str(tmp_path / "w")]) == 0
    for rel in ("model/model_index.json", "model/unet/config.json", "model/tokenizer", "image_encoder/config.json",
                "image_encoder/preprocessor_config.json", "adapter.safetensors"):
        assert os.path.exists(tmp_path / "w" / rel), rel


def test_demo(tmp_path, capsys):
    out = tmp_path / "demo" / "demo.png"
    assert main(["demo", "--cache", str(tmp_path / "cache"), "--out", str(out), "--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "warm-up" in text and "denoise_ms" in text and "RANDOM weights" in text
    assert out.exists() and (tmp_path / "demo" / "demo-condition.png").exists()
    assert main(["demo", "--model", "x"]) == 1  # real weights must come as a set
