"""LoRA on SDXL (engine/lora.py through diffusers' StableDiffusionXLLoraLoaderMixin): a random LoRA for the tiny
SDXL UNet and both text encoders, in diffusers' file layout and in kohya's (lora_unet_, lora_te1_, lora_te2_),
gives diffusers' own StableDiffusionXLPipeline latents; fused and switchable agree; scale 0 and unload give the
base back bit for bit; the second text encoder's layers are part of it."""
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

STEPS = 3
PROMPT, NEG = "a cat by a lake", "blurry"


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from ipadapter_instruct.engine.tiny import make_tiny_sdxl
    return make_tiny_sdxl(str(tmp_path_factory.mktemp("sdxl-lora") / "tiny"))


@pytest.fixture(scope="module")
def loras(sdxl, tmp_path_factory):
    """A random LoRA of the UNet, text_encoder and text_encoder_2 in diffusers' layout, and the same in kohya's."""
    from ipadapter_instruct.engine.tiny_parts import tiny_lora

    root = tmp_path_factory.mktemp("sdxl-loras")
    tiny_lora(str(root / "lora.safetensors"), sdxl["model"], 0, ("to_q", "to_k", "to_v", "to_out.0", "ff.net.2"))
    path = root / "lora.safetensors"
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    kohya = {}  # test-only: the engine never converts, diffusers' loader does
    for key, t in load_file(str(path)).items():
        m = re.fullmatch(r"(unet|text_encoder|text_encoder_2)\.(.+)\.(lora\.down|lora\.up|lora_linear_layer\.down|"
                         r"lora_linear_layer\.up|lora_A|lora_B)\.weight", key)
        assert m, key
        root_name, module, kind = m.groups()
        kind = "down" if kind.endswith(("down", "A")) else "up"
        if root_name != "unet" and not module.startswith("text_model."):
            module = "text_model." + module
        name = prefixes[root_name] + module.replace(".", "_")
        kohya[f"{name}.lora_{kind}.weight"] = t
        if kind == "down":
            kohya[f"{name}.alpha"] = torch.tensor(float(t.shape[0]))
    save_file(kohya, str(root / "kohya.safetensors"))
    return {"diffusers": path, "kohya": root / "kohya.safetensors"}


@pytest.fixture
def pipe(sdxl):
    from ipadapter_instruct.engine import Pipeline
    p = Pipeline.from_pretrained(sdxl["model"], device="cpu")
    p.set_progress_bar_config(disable=True)
    return p


def run(pipe):
    return pipe(PROMPT, negative_prompt=NEG, num_inference_steps=STEPS, guidance_scale=6.0, seed=1,
                output_type="latent")


def diffusers_with(sdxl, path, scale):
    from diffusers import StableDiffusionXLPipeline
    d = StableDiffusionXLPipeline.from_pretrained(sdxl["model"])
    d.set_progress_bar_config(disable=True)
    d.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="x")
    d.set_adapters(["x"], [scale])
    return d(PROMPT, negative_prompt=NEG, num_inference_steps=STEPS, guidance_scale=6.0,
             generator=torch.Generator("cpu").manual_seed(1), output_type="latent").images


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_sdxl_lora_matches_diffusers(sdxl, loras, pipe, fmt):
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = run(pipe)
    name = pipe.load_lora_weights(loras[fmt], scale=0.7)
    got = run(pipe)
    torch.testing.assert_close(got, diffusers_with(sdxl, loras[fmt], 0.7), atol=1e-4, rtol=1e-4)
    assert (got - base).abs().max() > 1e-2  # the LoRA matters, or the comparison proves nothing
    assert pipe.loras == {name: 0.7}
    wrapped = {k: sum(isinstance(m, BaseTunerLayer) for m in getattr(pipe, k).modules())
               for k in ("unet", "text_encoder", "text_encoder_2")}
    assert all(n > 0 for n in wrapped.values()), wrapped  # the second text encoder's layers too


def test_sdxl_lora_fused_switchable_scale_zero_and_unload(loras, pipe):
    base = run(pipe)
    name = pipe.load_lora_weights(loras["diffusers"], scale=0.7)  # fused
    fused = run(pipe)
    pipe.set_lora_scales({name: 0.7}, fuse=False)
    torch.testing.assert_close(run(pipe), fused, atol=1e-4, rtol=1e-4)  # merged vs on the side: rounding
    pipe.set_lora_scales({name: 0.0}, fuse=True)
    assert torch.equal(run(pipe), base)
    pipe.set_lora_scales({name: 0.7})
    torch.testing.assert_close(run(pipe), fused, atol=1e-4, rtol=1e-4)  # merged vs on the side: rounding
    pipe.unload_lora_weights()
    assert torch.equal(run(pipe), base) and pipe.loras == {} and not list(pipe._lora_layers())
