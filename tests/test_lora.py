"""LoRA through diffusers' loaders and peft (engine/lora.py): a diffusers/peft file and the same weights in kohya's
layout load into the UNet and text encoder and give diffusers' own latents; fused (the default) and switchable
agree; scale 0 and unload give the base back bit for bit; two LoRAs with scales; CUDA-graph entries dropped on a
weight change; a LoRA for another base is one line naming the file; the CLI's --lora FILE[:SCALE]."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import NEGATIVE, PROMPT
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.tiny_parts import LORA_UNET_TARGETS, tiny_lora

STEPS = 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_lora(tiny, folder, seed, unet_targets=LORA_UNET_TARGETS):
    """make-tiny's LoRA (engine/tiny_parts.py: random, for the tiny UNet and text encoder, diffusers' file layout)
    at `seed` as folder/lora.safetensors -> its path."""
    tiny_lora(str(folder / "lora.safetensors"), tiny["model"], seed, unet_targets)
    return folder / "lora.safetensors"


def to_kohya(path, out):
    """The same LoRA in kohya's layout (lora_unet_.../lora_te_text_model_..., lora_down/lora_up, alpha): what A1111
    and kohya's sd-scripts write. Test-only: the engine never converts, diffusers' loader does."""
    import re

    sd, kohya = load_file(str(path)), {}
    for key, t in sd.items():
        m = re.fullmatch(r"(unet|text_encoder)\.(.+)\.(lora\.down|lora\.up|lora_linear_layer\.down|"
                         r"lora_linear_layer\.up|lora_A|lora_B)\.weight", key)
        assert m, key
        root, module, kind = m.groups()
        kind = "down" if kind.endswith(("down", "A")) else "up"
        if root == "text_encoder" and not module.startswith("text_model."):
            module = "text_model." + module
        name = ("lora_unet_" if root == "unet" else "lora_te_") + module.replace(".", "_")
        kohya[f"{name}.lora_{kind}.weight"] = t
        if kind == "down":
            kohya[f"{name}.alpha"] = torch.tensor(float(t.shape[0]))  # alpha = rank: scaling 1, as diffusers' file
    save_file(kohya, str(out))
    return out


@pytest.fixture(scope="module")
def loras(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    (root / "a").mkdir()
    (root / "b").mkdir()
    a = make_lora(tiny, root / "a", 0)
    return {"a": a, "b": make_lora(tiny, root / "b", 1, ("to_q", "to_v")), "kohya": to_kohya(a, root / "a_kohya.safetensors")}


@pytest.fixture
def pipe(tiny):
    from ipadapter_instruct.engine import Pipeline
    p = Pipeline.from_pretrained(tiny["model"], device="cpu")
    p.set_progress_bar_config(disable=True)
    return p


def run(pipe, **kw):
    return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, seed=1, output_type="latent", **kw)


def diffusers_with(tiny, path, scale):
    from diffusers import StableDiffusionPipeline
    d = StableDiffusionPipeline.from_pretrained(tiny["model"], safety_checker=None, requires_safety_checker=False)
    d.set_progress_bar_config(disable=True)
    d.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="x")
    d.set_adapters(["x"], [scale])
    return d(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=6.0,
             generator=torch.Generator("cpu").manual_seed(1), output_type="latent").images


@pytest.mark.parametrize("fmt", ["a", "kohya"])
def test_lora_matches_diffusers(tiny, loras, pipe, fmt):
    base = run(pipe)
    name = pipe.load_lora_weights(loras[fmt], scale=0.7)
    got = run(pipe)
    torch.testing.assert_close(got, diffusers_with(tiny, loras[fmt], 0.7), atol=1e-4, rtol=1e-4)
    assert (got - base).abs().max() > 1e-2  # the LoRA matters, or the comparison proves nothing
    assert pipe.loras == {name: 0.7} and len(list(pipe._lora_layers())) > 0


def test_fused_switchable_scale_zero_and_unload(loras, pipe):
    base = run(pipe)
    name = pipe.load_lora_weights(loras["a"], scale=0.7)  # fused
    fused = run(pipe)
    pipe.set_lora_scales({name: 0.7}, fuse=False)
    torch.testing.assert_close(run(pipe), fused, atol=1e-5, rtol=1e-5)
    pipe.set_lora_scales({name: 0.0})
    assert torch.equal(run(pipe), base)
    pipe.set_lora_scales({name: 0.0}, fuse=True)
    assert torch.equal(run(pipe), base)
    pipe.set_lora_scales({name: 0.7})
    torch.testing.assert_close(run(pipe), fused, atol=1e-5, rtol=1e-5)
    pipe.unload_lora_weights()
    assert torch.equal(run(pipe), base) and pipe.loras == {} and not list(pipe._lora_layers())


def test_two_loras_with_scales(loras, pipe):
    base = run(pipe)
    a = pipe.load_lora_weights(loras["a"], adapter_name="a", scale=0.5)
    only_a = run(pipe)
    b = pipe.load_lora_weights(loras["b"], adapter_name="b", scale=0.8)
    both = run(pipe)
    assert (both - only_a).abs().max() > 1e-3
    pipe.set_lora_scales({b: 0.0})
    torch.testing.assert_close(run(pipe), only_a, atol=1e-5, rtol=1e-5)
    pipe.set_lora_scales({a: 0.0})
    assert torch.equal(run(pipe), base)
    with pytest.raises(EngineError, match="no LoRA named c is loaded; loaded: a, b"):
        pipe.set_lora_scales({"c": 1.0})
    with pytest.raises(EngineError, match="a LoRA named 'a' is loaded already"):
        pipe.load_lora_weights(loras["a"], adapter_name="a")


def test_cuda_graph_entries_are_dropped_on_a_weight_change(loras, pipe):
    from ipadapter_instruct.engine.cuda_graphs import StaticUNet
    pipe._static = StaticUNet(pipe.unet, capture=False)
    run(pipe)
    assert pipe._static.entries
    pipe.load_lora_weights(loras["a"], scale=0.7)
    assert not pipe._static.entries  # built again on the next call, not per request
    run(pipe)
    n = len(pipe._static.entries)
    run(pipe)
    assert len(pipe._static.entries) == n


def test_bad_loras_are_one_line_naming_the_file(loras, pipe, tmp_path):
    base = run(pipe)
    with pytest.raises(EngineError, match="LoRA file not found: .*none.safetensors"):
        pipe.load_lora_weights(tmp_path / "none.safetensors")
    sd = load_file(str(loras["a"]))
    wrong = {k: torch.zeros(t.shape[0], t.shape[1] + 3) if k.startswith("unet.") and ".to_q." in k and
             ("down" in k or "lora_A" in k) else t for k, t in sd.items()}
    save_file(wrong, str(tmp_path / "other_base.safetensors"))
    with pytest.raises(EngineError, match=r"cannot load the LoRA .*other_base\.safetensors: .*size mismatch .*another "
                                          r"base model") as e:
        pipe.load_lora_weights(tmp_path / "other_base.safetensors")
    assert "\n" not in str(e.value)
    assert torch.equal(run(pipe), base) and pipe.loras == {}  # nothing half-loaded stays


def test_cli_lora_flag(tiny, loras, pipe, tmp_path):
    out = tmp_path / "x.png"
    r = subprocess.run([sys.executable, "-m", "engine", "generate", "--model", tiny["model"], "--prompt", PROMPT,
                        "--negative-prompt", NEGATIVE, "--steps", str(STEPS), "--seed", "1", "--device", "cpu",
                        "--lora", f"{loras['a']}:0.7", "--no-progress", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    pipe.load_lora_weights(loras["a"], scale=0.7)
    import numpy as np
    from PIL import Image
    want = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, seed=1)[0]
    assert np.abs(np.asarray(Image.open(out).convert("RGB"), int) - np.asarray(want, int)).max() <= 1
    r = subprocess.run([sys.executable, "-m", "engine", "generate", "--model", tiny["model"], "--device", "cpu",
                        "--lora", f"{loras['a']}:x", "--out", str(tmp_path / "y.png")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--lora" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_serve_with_a_lora(tiny, loras, pipe):
    """serve --lora FILE:SCALE fuses it at start-up: answers equal the pipeline with the same LoRA."""
    import numpy as np

    from ipadapter_instruct.engine.server.config import ServerConfig
    from server_utils import InProcessServer, decode_png

    server = InProcessServer(ServerConfig(model=tiny["model"], device="cpu", lora=((str(loras["a"]), 0.7),)), None)
    try:
        r = server.request("POST", "/v1/generate", json={"prompt": PROMPT, "negative_prompt": NEGATIVE,
                                                         "num_inference_steps": STEPS, "seed": 1})
        assert r.status_code == 200, r.text
        assert server.state.pipe.loras == {"lora_0": 0.7}
    finally:
        server.close()
    pipe.load_lora_weights(loras["a"], scale=0.7)
    want = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, seed=1)[0]
    assert np.abs(np.asarray(decode_png(r.json()["images"][0]), int) - np.asarray(want, int)).max() <= 1
