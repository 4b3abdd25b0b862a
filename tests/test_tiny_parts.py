"""`make-tiny` also writes a tiny ControlNet and a tiny LoRA that fit its model (engine/tiny_parts.py), so the docs'
ControlNet and LoRA examples run as written on tiny weights: the CLI's generate and the Python API take them
together and give the same image; the SDXL set's parts load into the SDXL pipeline; the edit set has a LoRA and no
ControlNet (InstructPix2Pix takes none), and asking for one is one line."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a red house by a lake"


def cli(*args):
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """`python -m engine make-tiny DIR` as the docs run it: the parts are on by default."""
    folder = tmp_path_factory.mktemp("make-tiny") / "tiny"
    r = cli("make-tiny", str(folder))
    assert r.returncode == 0, r.stderr
    printed = dict(line.split(": ", 1) for line in r.stdout.strip().splitlines() if ": " in line)
    assert printed["controlnet"] == str(folder / "controlnet") and printed["lora"] == str(folder / "lora.safetensors")
    return folder


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    path = tmp_path_factory.mktemp("control") / "edges.png"
    Image.fromarray((np.random.RandomState(1).rand(64, 64, 3) * 255).astype("uint8")).save(path)
    return path


def test_make_tiny_writes_a_controlnet_and_a_lora_in_their_formats(made):
    import json

    from safetensors import safe_open
    config = json.loads((made / "controlnet" / "config.json").read_text())
    unet = json.loads((made / "model" / "unet" / "config.json").read_text())
    assert config["_class_name"] == "ControlNetModel" and config["block_out_channels"] == unet["block_out_channels"]
    assert (made / "controlnet" / "diffusion_pytorch_model.safetensors").exists()
    with safe_open(str(made / "lora.safetensors"), "pt") as f:
        roots = {k.split(".")[0] for k in f.keys()}
    assert roots == {"unet", "text_encoder"}


def test_cli_generate_with_the_tiny_controlnet_and_lora_equals_the_python_api(made, control, tmp_path):
    out = tmp_path / "out.png"
    r = cli("generate", "--model", str(made / "model"), "--prompt", PROMPT, "--controlnet", str(made / "controlnet"),
            "--control-image", str(control), "--lora", f"{made / 'lora.safetensors'}:0.7", "--steps", "2",
            "--seed", "1", "--device", "cpu", "--no-progress", "--out", str(out))
    assert r.returncode == 0, r.stderr

    from ipadapter_instruct.engine import Pipeline
    pipe = Pipeline.from_pretrained(str(made / "model"), controlnet=str(made / "controlnet"), device="cpu")
    pipe.load_lora_weights(str(made / "lora.safetensors"), scale=0.7)
    pipe.set_progress_bar_config(disable=True)
    want = pipe(PROMPT, control_image=Image.open(control), num_inference_steps=2, seed=1)[0]
    with Image.open(out) as got:
        assert np.abs(np.asarray(got.convert("RGB"), int) - np.asarray(want, int)).max() <= 1
    plain = Pipeline.from_pretrained(str(made / "model"), device="cpu")
    plain.set_progress_bar_config(disable=True)
    base = plain(PROMPT, num_inference_steps=2, seed=1)[0]
    assert np.abs(np.asarray(base, int) - np.asarray(want, int)).max() > 0  # the parts act


def test_sdxl_parts_load_into_the_sdxl_pipeline(control, tmp_path):
    from ipadapter_instruct.engine import Pipeline
    from ipadapter_instruct.engine.tiny import make_tiny_sdxl
    paths = make_tiny_sdxl(str(tmp_path / "sdxl"), controlnet=True, lora=True)
    pipe = Pipeline.from_pretrained(paths["model"], controlnet=paths["controlnet"], device="cpu")
    pipe.load_lora_weights(paths["lora"], scale=0.7)
    assert pipe.kind == "sdxl" and pipe.loras == {"lora_0": 0.7}
    pipe.set_progress_bar_config(disable=True)
    assert pipe(PROMPT, control_image=Image.open(control), num_inference_steps=1, seed=1)[0].size == (64, 64)


def test_edit_set_has_a_lora_and_no_controlnet(tmp_path):
    r = cli("make-tiny", str(tmp_path / "e"), "--edit", "--controlnet")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "InstructPix2Pix" in r.stderr, r.stderr
    assert not (tmp_path / "e").exists()

    from ipadapter_instruct.engine import EditPipeline
    from ipadapter_instruct.engine.tiny import make_tiny
    paths = make_tiny(str(tmp_path / "edit"), edit=True, lora=True)
    assert "controlnet" not in paths and not os.path.exists(tmp_path / "edit" / "controlnet")
    pipe = EditPipeline.from_pretrained(paths["model"], device="cpu")
    pipe.load_lora_weights(paths["lora"], scale=0.7)
    pipe.set_progress_bar_config(disable=True)
    photo = Image.new("RGB", (64, 64), (120, 80, 40))
    assert pipe("make it winter", photo, num_inference_steps=1, seed=1)[0].size == (64, 64)
