"""Strict checkpoint loading: both file formats, size inference, and a named error for every mismatch."""
import json
import os
import shutil

import pytest
import torch
from conftest import PROMPT

from ipadapter_instruct.engine import EngineError, Pipeline
from ipadapter_instruct.engine.adapter import read_adapter_file
from ipadapter_instruct.engine.projector import InstructProjector, ProjectorConfig

STEPS = 2


def write_bin(path, image_proj, ip_adapter):
    torch.save({"image_proj": image_proj, "ip_adapter": ip_adapter}, path)


@pytest.fixture
def ckpt(tiny):
    return read_adapter_file(tiny["adapter"])


def test_bin_and_safetensors_give_the_same_image(tiny, instruct_pipe, cond_image, ckpt, tmp_path):
    write_bin(tmp_path / "a.bin", *ckpt)
    from_bin = Pipeline.from_pretrained(tiny["model"], image_encoder=tiny["image_encoder"], adapter=tmp_path / "a.bin",
                                        device="cpu")  # as instruct_pipe (the default would be cuda/fp16 on a GPU)
    from_bin.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=STEPS, seed=4, output_type="latent")
    a = instruct_pipe(PROMPT, cond_image, "take the object", **kw)
    b = from_bin(PROMPT, cond_image, "take the object", **kw)
    assert torch.equal(a, b)


def test_kinds_told_apart_by_keys(instruct_pipe, plus_pipe):
    assert instruct_pipe.adapter.kind == "instruct"
    assert plus_pipe.adapter.kind == "plus"


@pytest.mark.parametrize("preset", ["sd15", "sd15-plus"])
def test_sizes_inferred_from_tensors(preset):
    cfg = ProjectorConfig.preset(preset)
    with torch.device("meta"):
        module = InstructProjector(cfg)
    assert ProjectorConfig.from_state_dict(module.state_dict()) == cfg
    if preset == "sd15":  # SPEC.md: about 68.9 M parameters
        assert abs(sum(p.numel() for p in module.parameters()) / 1e6 - 68.9) < 0.1


def load_with(tiny, tmp_path, image_proj, ip_adapter, name="bad.bin"):
    write_bin(tmp_path / name, image_proj, ip_adapter)
    return Pipeline.from_pretrained(tiny["model"], image_encoder=tiny["image_encoder"], adapter=tmp_path / name)


def test_missing_projector_key_is_named(tiny, ckpt, tmp_path):
    image_proj, ip = ckpt
    image_proj = {k: v for k, v in image_proj.items() if k != "layers.2.1.3.weight"}
    with pytest.raises(EngineError, match=r"missing keys: layers\.2\.1\.3\.weight"):
        load_with(tiny, tmp_path, image_proj, ip)


def test_unexpected_projector_key_is_named(tiny, ckpt, tmp_path):
    image_proj, ip = ckpt
    with pytest.raises(EngineError, match=r"unexpected keys: extra\.weight"):
        load_with(tiny, tmp_path, {**image_proj, "extra.weight": torch.zeros(3)}, ip)


def test_misshaped_key_is_named(tiny, ckpt, tmp_path):
    image_proj, ip = ckpt
    bad = dict(ip)
    bad["3.to_v_ip.weight"] = torch.zeros(5, 7)
    with pytest.raises(EngineError, match=r"mis-shaped keys: layers\.3\.to_v_ip\.weight \(5, 7\)"):
        load_with(tiny, tmp_path, image_proj, bad)


def test_missing_and_misplaced_layer_keys(tiny, ckpt, tmp_path):
    image_proj, ip = ckpt
    moved = {("2" + k[1:] if k.startswith("1.") else k): v for k, v in ip.items()}  # layer 1 filed under attn1's index
    with pytest.raises(EngineError, match=r"ip_adapter.*missing keys: layers\.1\.to_k_ip.*unexpected keys: layers\.2\."):
        load_with(tiny, tmp_path, image_proj, moved)


def test_plain_ip_adapter_loads_as_plain(tiny, ckpt, tmp_path):
    """ip-adapter_sd15.bin's layout (proj + norm): 4 tokens of the UNet's width (tests/test_plain_adapter.py checks
    it against diffusers); a proj that is no multiple of the token width is one line."""
    _, ip = ckpt
    plain = {"proj.weight": torch.zeros(128, 32), "proj.bias": torch.zeros(128), "norm.weight": torch.ones(32),
             "norm.bias": torch.zeros(32)}
    adapter = load_with(tiny, tmp_path, plain, ip).adapter
    assert adapter.kind == "plain" and adapter.projector.config.num_tokens == 4
    with pytest.raises(EngineError, match=r"proj.weight \(130, 32\) is not a multiple of the token width 32"):
        load_with(tiny, tmp_path, {**plain, "proj.weight": torch.zeros(130, 32)}, ip)


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_corrupt_checkpoint(tiny, tmp_path, suffix):
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(EngineError, match="cannot read adapter"):
        Pipeline.from_pretrained(tiny["model"], image_encoder=tiny["image_encoder"], adapter=path)


def test_safetensors_without_prefixes(tiny, tmp_path, ckpt):
    from safetensors.torch import save_file
    image_proj, _ = ckpt
    save_file({k: v.contiguous() for k, v in image_proj.items()}, tmp_path / "flat.safetensors")
    with pytest.raises(EngineError, match="outside image_proj./ip_adapter."):
        read_adapter_file(tmp_path / "flat.safetensors")


def test_checkpoint_without_ip_adapter(tiny, tmp_path, ckpt):
    torch.save({"image_proj": ckpt[0]}, tmp_path / "half.bin")
    with pytest.raises(EngineError, match="no ip_adapter weights"):
        read_adapter_file(tmp_path / "half.bin")


def test_missing_files_and_folders(tiny, tmp_path):
    with pytest.raises(EngineError, match="adapter file not found"):
        Pipeline.from_pretrained(tiny["model"], image_encoder=tiny["image_encoder"], adapter=tmp_path / "nope.bin")
    with pytest.raises(EngineError, match="base model not found"):
        Pipeline.from_pretrained(str(tmp_path / "nothing"))
    with pytest.raises(EngineError, match="image encoder not found"):
        Pipeline.from_pretrained(tiny["model"], image_encoder=str(tmp_path / "enc"), adapter=tiny["adapter"])
    broken = tmp_path / "model"
    shutil.copytree(tiny["model"], broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(EngineError, match=r"missing vae/"):
        Pipeline.from_pretrained(broken)


def test_unreadable_config_is_one_line(tiny, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(tiny["model"], broken)
    (broken / "unet" / "config.json").write_text("{not json")
    with pytest.raises(EngineError, match="cannot load UNet") as err:
        Pipeline.from_pretrained(broken)
    assert "\n" not in str(err.value)


def test_image_processor_must_fit_the_encoder(tiny, tmp_path):
    enc = tmp_path / "enc"
    shutil.copytree(tiny["image_encoder"], enc)
    os.remove(enc / "preprocessor_config.json")  # CLIP's 224 defaults, but this encoder takes 32 px
    with pytest.raises(EngineError, match=r"crops to \(224, 224\).*expects 32x32"):
        Pipeline.from_pretrained(tiny["model"], image_encoder=enc, adapter=tiny["adapter"])


def test_vae_factor_read_from_config(tiny, instruct_pipe):
    with open(os.path.join(tiny["model"], "vae", "config.json")) as fh:
        levels = len(json.load(fh)["block_out_channels"])
    assert instruct_pipe.vae_scale_factor == 2 ** (levels - 1) == 4


def test_adapter_checked_before_base_weights_load(tmp_path):
    # the base model path is bad too, but the missing adapter is reported first: no time spent loading
    with pytest.raises(EngineError, match="adapter file not found"):
        Pipeline.from_pretrained(str(tmp_path / "no-model"), image_encoder=str(tmp_path), adapter=tmp_path / "a.bin")


def test_sd15_layout_expects_the_released_keys():
    """A real ip-adapter-instruct-sd15.bin has to_k_ip/to_v_ip at odd indices 1..31 (SPEC.md): built on the meta
    device from SD1.5's UNet config, the engine expects exactly those keys and widths."""
    from diffusers import UNet2DConditionModel

    from ipadapter_instruct.engine.adapter import AdapterLayers
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)  # diffusers' defaults are SD1.5's
        layers = AdapterLayers(unet, 768)
    sd = layers.state_dict()
    want = {f"layers.{i}.to_{kv}_ip.weight" for i in range(1, 32, 2) for kv in "kv"}
    assert set(sd) == want
    widths = [sd[f"layers.{i}.to_k_ip.weight"].shape for i in range(1, 32, 2)]
    assert sorted({w[0] for w in widths}) == [320, 640, 1280] and {w[1] for w in widths} == {768}
    assert widths[-1][0] == 1280  # index 31 is the mid block
