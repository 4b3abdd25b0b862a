"""`python -m train` as a new user meets it: --help shows the defaults, and --resolution defaults to the model's
native size (UNet sample_size x VAE factor, read from the model's configs), not SD1.5's 512."""
import argparse
import json
import os

import pytest
import torch

from ipadapter_instruct.train.__main__ import main, train_parser


def flat(text: str) -> str:
    return " ".join(text.split())  # argparse wraps help text at the terminal width


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = flat(capsys.readouterr().out)
    shown = 0
    for action in train_parser()._actions:
        if not action.option_strings or action.default in (None, argparse.SUPPRESS) or action.default is False:
            continue
        assert f"(default: {action.default})" in text, action.dest
        shown += 1
    assert shown >= 10  # steps, batch size, grad accum, lr, mixed precision, save-every, warm-up, ...
    assert "--resolution RESOLUTION training image size in pixels (default: the model's native size" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def native_pixels(model: str) -> int:
    # from the configs on disk, independently of the trainer
    with open(os.path.join(model, "unet", "config.json")) as fh:
        sample = json.load(fh)["sample_size"]
    with open(os.path.join(model, "vae", "config.json")) as fh:
        factor = 2 ** (len(json.load(fh)["block_out_channels"]) - 1)
    return sample * factor


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from ipadapter_instruct.train.data import make_synthetic
    return make_synthetic(str(tmp_path_factory.mktemp("synthetic")), 6, seed=0, size=48)


def train_one_step(tiny, data, out, *extra) -> dict:
    args = ["--model", tiny["model"], "--image-encoder", tiny["image_encoder"], "--data", data, "--out", str(out),
            "--steps", "1", "--save-every", "1", "--batch-size", "2", "--val-fraction", "0.2", "--no-progress",
            "--device", "cpu", *extra]
    assert main(args) == 0
    checkpoints = sorted(os.listdir(out / "checkpoints"))
    assert checkpoints == ["step-00000001.pt"]  # docs/training.md's name, zero-padded to 8 digits
    return torch.load(out / "checkpoints" / checkpoints[0], weights_only=True)["config"]  # tensors and plain values only


@pytest.mark.parametrize("given", [None, 32])
def test_resolution_defaults_to_the_models_native_size(tiny, synthetic, tmp_path, given, monkeypatch):
    from ipadapter_instruct.train import data

    seen = []
    real = data.target_tensor
    monkeypatch.setattr(data, "target_tensor", lambda image, res: seen.append(res) or real(image, res))
    extra = [] if given is None else ["--resolution", str(given)]
    config = train_one_step(tiny, synthetic, tmp_path / "run", *extra)
    want = native_pixels(tiny["model"]) if given is None else given
    assert native_pixels(tiny["model"]) != 512  # not SD1.5-sized, so the old default of 512 would show
    assert config["resolution"] == want  # recorded resolved in the checkpoint
    assert seen and set(seen) == {want}  # and every target image was made at that size
