"""Single-file checkpoints (`model.safetensors` in the original LDM layout, as A1111 and ComfyUI keep SD1.5, its
inpainting model and InstructPix2Pix, and SDXL base's SGM layout) through diffusers' `from_single_file` with local configs only: the
parts equal the diffusers folder's bitwise and generate the same latents; the shipped configs are SD1.5's, SD1.5
inpainting's, InstructPix2Pix's and SDXL base's at full size; no socket is opened; every wrong file or config folder is one line
naming it, before any weight loads."""
import os
import shutil
import socket

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import PROMPT
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.loading import is_edit_model, is_inpainting_model, load_base, native_size, read_configs
from ipadapter_instruct.engine.single_file import CONFIGS, check_checkpoint_keys, checkpoint_kind, checkpoint_shapes, config_folder

KINDS = ("sd15", "ip2p", "inpaint")
MODULES = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """kind -> the tiny original-layout file; its diffusers folder (the same weights) is model/ beside it."""
    from ipadapter_instruct.engine.tiny import make_tiny_single_file
    root = tmp_path_factory.mktemp("single")
    return {kind: make_tiny_single_file(str(root / kind), edit=kind == "ip2p", inpaint=kind == "inpaint")
            for kind in KINDS}


def folder_of(path):
    return os.path.join(os.path.dirname(path), "model")


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach the network fails the test (HF_HUB_OFFLINE=1 is set too, by conftest)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def one_line(excinfo, *names):
    text = str(excinfo.value)
    assert "\n" not in text and all(os.fspath(n) in text for n in names), text
    return text


@pytest.mark.parametrize("kind", KINDS)
def test_parts_equal_the_folders_bitwise(files, kind, offline):
    single = load_base(files[kind], torch.float32, config=folder_of(files[kind]))
    folder = load_base(folder_of(files[kind]), torch.float32)
    for name in MODULES:
        a, b = single[name].state_dict(), folder[name].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert single["tokenizer"](PROMPT).input_ids == folder["tokenizer"](PROMPT).input_ids
    assert type(single["scheduler"]) is type(folder["scheduler"])
    assert dict(single["scheduler"].config) == dict(folder["scheduler"].config)


def test_ckpt_and_half_precision(files, tmp_path, offline):
    from ipadapter_instruct.engine.tiny import to_single_file
    folder = folder_of(files["sd15"])
    ckpt = load_base(to_single_file(folder, str(tmp_path / "model.ckpt")), torch.float32, config=folder)
    ref = load_base(folder, torch.float32)
    for name in MODULES:
        a, b = ckpt[name].state_dict(), ref[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b), name
    half = load_base(files["sd15"], torch.float16, config=folder)
    assert all(p.dtype == torch.float16 for name in MODULES for p in half[name].parameters())


def test_same_latents_as_the_folder(files):
    from ipadapter_instruct.engine import EditPipeline, Pipeline
    kw = dict(num_inference_steps=2, seed=3, output_type="latent")
    photo = Image.new("RGB", (64, 64), (120, 40, 200))
    for kind, cls, args in (("sd15", Pipeline, (PROMPT,)), ("ip2p", EditPipeline, ("make it winter", photo))):
        folder = folder_of(files[kind])
        single = cls(**load_base(files[kind], torch.float32, config=folder), device="cpu")
        ref = cls.from_pretrained(folder, device="cpu", dtype="float32")
        for pipe in (single, ref):
            pipe.set_progress_bar_config(disable=True)
        assert torch.equal(single(*args, **kw), ref(*args, **kw)), kind


def test_an_inpainting_file_inpaints_as_its_folder(files, offline):
    """The SD1.5 inpainting layout (a 9-channel UNet input conv) loads through StableDiffusionInpaintPipeline's
    from_single_file and gives the folder's image for an inpainting call; without a mask it is one line."""
    import numpy as np

    from ipadapter_instruct.engine import Pipeline
    path, folder = files["inpaint"], folder_of(files["inpaint"])
    assert checkpoint_kind(path, checkpoint_shapes(path)) == "inpaint"
    pipes = [Pipeline.from_pretrained(path, config=folder, device="cpu"), Pipeline.from_pretrained(folder, device="cpu")]
    photo = Image.new("RGB", (64, 64), (120, 40, 200))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    kw = dict(init_image=photo, mask_image=mask, strength=0.75, num_inference_steps=3, seed=4)
    images = []
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
        assert pipe.capabilities.inpaint
        images.append(np.asarray(pipe(PROMPT, **kw)[0]))
    assert np.array_equal(*images)
    with pytest.raises(EngineError, match="this is an inpainting model"):
        pipes[0](PROMPT, num_inference_steps=2, seed=4)


def test_header_answers_without_loading(files):
    t2i, ip2p = files["sd15"], files["ip2p"]
    assert native_size(t2i, folder_of(t2i)) == (64, 4)  # the tiny configs
    assert native_size(t2i) == (512, 8)  # the shipped SD1.5 configs
    assert is_edit_model(ip2p) and is_edit_model(ip2p, folder_of(ip2p))
    assert not is_edit_model(t2i) and not is_edit_model(t2i, folder_of(t2i))
    inpaint = files["inpaint"]
    assert is_inpainting_model(inpaint) and is_inpainting_model(inpaint, folder_of(inpaint))
    assert not any(is_inpainting_model(f) or is_edit_model(f) is not (f == ip2p) for f in (t2i, ip2p))
    assert native_size(inpaint) == (512, 8)  # the shipped SD1.5 inpainting configs
    assert read_configs(ip2p, folder_of(t2i)) is None  # file and configs disagree: load_base says why
    assert read_configs(os.path.join(os.path.dirname(t2i), "gone.safetensors")) is None


@pytest.mark.parametrize("kind", KINDS)
def test_the_shipped_configs_are_chosen_and_a_mismatch_names_the_file(files, kind, offline):
    path = files[kind]
    assert config_folder(path, checkpoint_kind(path, checkpoint_shapes(path))) == os.path.join(CONFIGS, kind)
    with pytest.raises(EngineError, match=r"UNet: \d+ mis-shaped \(conv_in.bias \(32,\) vs \(320,\)") as e:
        load_base(path, torch.float32)
    one_line(e, path, os.path.join(CONFIGS, kind), "config=")


@pytest.mark.parametrize("kind", KINDS)
def test_the_shipped_configs_are_sd15_at_full_size(kind):
    """On the meta device: the public parameter counts, and an SD1.5-shaped original-layout file's keys (what
    ldm_state_dict writes, the reverse of diffusers' converters) are exactly what the shipped configs expect."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ipadapter_instruct.engine.model_folders import folder_scheduler
    from ipadapter_instruct.engine.tiny import ldm_state_dict

    folder = os.path.join(CONFIGS, kind)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))
    count = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)]
    channels = {"sd15": 4, "ip2p": 8, "inpaint": 9}[kind]
    assert unet.config.in_channels == channels
    assert count == [859_520_964 + 320 * (channels - 4) * 3 * 3, 83_653_863, 123_060_480]
    shapes = {k: tuple(v.shape) for k, v in ldm_state_dict(unet, vae, text).items()}
    assert checkpoint_kind("sd.safetensors", shapes) == kind
    check_checkpoint_keys("sd.safetensors", shapes, folder, shipped=True)
    schedulers = {"sd15": "PNDMScheduler", "ip2p": "EulerAncestralDiscreteScheduler", "inpaint": "DDIMScheduler"}
    assert type(folder_scheduler(folder)).__name__ == schedulers[kind]
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(CONFIGS, "tokenizer"))  # CLIP ViT-L/14's
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


UNET, VAE = "model.diffusion_model.", "first_stage_model."
BAD_FILES = {  # name: (change to the tiny SD1.5 file's tensors, what the error says)
    "missing": (lambda sd: sd.pop(UNET + "out.2.bias"), r"UNet: 1 missing \(conv_out.bias\)"),
    "unexpected": (lambda sd: sd.update({UNET + "input_blocks.1.1.extra.weight": torch.ones(2)}),
                   r"UNet: 1 unexpected \(down_blocks.0.attentions.0.extra.weight\)"),
    "mis-shaped": (lambda sd: sd.update({VAE + "quant_conv.weight": torch.ones(8, 8, 1, 2)}),
                   r"VAE: 1 mis-shaped \(quant_conv.weight \(8, 8, 1, 2\) vs \(8, 8, 1, 1\)\)"),
    "no VAE": (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith(VAE)], r"no VAE weights \(first_stage_model"),
    "SDXL refiner": (lambda sd: sd.update({"conditioner.embedders.0.model.x": torch.ones(2)}),
                     "is an SDXL refiner checkpoint"),
    "half SDXL": (lambda sd: sd.update({"conditioner.embedders.0.transformer.x": torch.ones(2)}),
                  "not an original-layout SDXL checkpoint: it has no second text encoder weights"),
    "5 channels": (lambda sd: sd.update({UNET + "input_blocks.0.0.weight": torch.ones(32, 5, 3, 3)}),
                   "takes 5 channels; SD1.5 takes 4, InstructPix2Pix 8 and SD1.5 inpainting 9"),
    "LoRA": (lambda sd: [sd.clear(), sd.update({"lora_unet_x.alpha": torch.ones(())})],
             "not an original-layout SD1.5 / InstructPix2Pix checkpoint: it has no UNet, VAE, text encoder"),
}


@pytest.mark.parametrize("bad", BAD_FILES)
def test_a_wrong_file_is_one_line_naming_it(files, tmp_path, bad, offline):
    change, message = BAD_FILES[bad]
    sd = load_file(files["sd15"])
    change(sd)
    path = str(tmp_path / f"{bad}.safetensors")
    save_file(sd, path)
    with pytest.raises(EngineError, match=message) as e:
        load_base(path, torch.float32, config=folder_of(files["sd15"]))
    one_line(e, path)


def test_unreadable_and_absent_files(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    with pytest.raises(EngineError, match="cannot read checkpoint") as e:
        load_base(garbage, torch.float32)
    one_line(e, garbage)
    with pytest.raises(EngineError, match="base model file not found") as e:
        load_base(tmp_path / "absent.ckpt", torch.float32)
    one_line(e, tmp_path / "absent.ckpt")


def test_config_folder_errors(files, tmp_path):
    t2i, ip2p = files["sd15"], files["ip2p"]
    with pytest.raises(EngineError, match="config folder not found") as e:
        load_base(t2i, torch.float32, config=tmp_path / "nowhere")
    one_line(e, tmp_path / "nowhere")
    partial = tmp_path / "partial"
    shutil.copytree(folder_of(t2i), partial, ignore=shutil.ignore_patterns("tokenizer"))
    with pytest.raises(EngineError, match="is not a diffusers Stable Diffusion folder: missing tokenizer$") as e:
        load_base(t2i, torch.float32, config=partial)
    one_line(e, partial)
    with pytest.raises(EngineError, match="is an InstructPix2Pix checkpoint .* has a 4-channel UNet") as e:
        load_base(ip2p, torch.float32, config=folder_of(t2i))
    one_line(e, ip2p, folder_of(t2i))
    with pytest.raises(EngineError, match="is an inpainting checkpoint .* has a 4-channel UNet") as e:
        load_base(files["inpaint"], torch.float32, config=folder_of(t2i))
    one_line(e, files["inpaint"], folder_of(t2i))
    with pytest.raises(EngineError, match="config= names the configs of a single-file checkpoint") as e:
        load_base(folder_of(t2i), torch.float32, config=folder_of(t2i))
    one_line(e, folder_of(t2i))


def test_text_to_image_file_to_edit_and_the_reverse(files):
    from ipadapter_instruct.engine import EditPipeline, Pipeline
    t2i, ip2p = files["sd15"], files["ip2p"]
    with pytest.raises(EngineError, match="this is a text-to-image model"):
        EditPipeline(**load_base(t2i, torch.float32, config=folder_of(t2i)))
    with pytest.raises(EngineError, match="this is an InstructPix2Pix model"):
        Pipeline(**load_base(ip2p, torch.float32, config=folder_of(ip2p)))


def test_cli_and_api_take_a_single_file(files, tmp_path, capsys):
    """`generate --model FILE --model-config DIR` and `edit` the same: the images equal the folder's through the API;
    a config folder given with a diffusers folder is one line."""
    import numpy as np

    from ipadapter_instruct.engine import EditPipeline, Pipeline
    from ipadapter_instruct.engine.__main__ import main

    out = tmp_path / "gen.png"
    assert main(["generate", "--model", files["sd15"], "--model-config", folder_of(files["sd15"]), "--prompt", PROMPT,
                 "--steps", "2", "--seed", "0", "--no-progress", "--out", str(out)]) == 0, capsys.readouterr().err
    want = Pipeline.from_pretrained(folder_of(files["sd15"]), device="cpu")(PROMPT, num_inference_steps=2, seed=0)[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(want))
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), (90, 140, 200)).save(photo)
    out = tmp_path / "edit.png"
    assert main(["edit", "--model", files["ip2p"], "--model-config", folder_of(files["ip2p"]), "--image", str(photo),
                 "--prompt", "make it red", "--steps", "2", "--seed", "5", "--no-progress", "--out", str(out)]) == 0
    want = EditPipeline.from_pretrained(folder_of(files["ip2p"]), device="cpu")("make it red", str(photo),
                                                                               num_inference_steps=2, seed=5)[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(want))
    with pytest.raises(EngineError, match="drop config="):
        Pipeline.from_pretrained(folder_of(files["sd15"]), config=folder_of(files["sd15"]))


# ----- SDXL base ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
    """The tiny SDXL model as an original-layout (SGM) file; its diffusers folder is model/ beside it."""
    from ipadapter_instruct.engine.tiny import make_tiny_single_file
    return make_tiny_single_file(str(tmp_path_factory.mktemp("single-sdxl") / "sdxl"), sdxl=True)


def test_an_sdxl_file_loads_as_its_folder(sdxl_file, offline):
    """Both text encoders (CLIP-L in transformers' layout, the second in OpenCLIP's) and the UNet's added-conditioning
    MLP come through bitwise; the pipeline is an SDXLPipeline and generates the folder's latents."""
    from ipadapter_instruct.engine import Pipeline
    from ipadapter_instruct.engine.sdxl import SDXLPipeline

    path, folder = sdxl_file, folder_of(sdxl_file)
    assert checkpoint_kind(path, checkpoint_shapes(path)) == "sdxl"
    single = load_base(path, torch.float32, config=folder)
    ref = load_base(folder, torch.float32)
    for name in (*MODULES, "text_encoder_2"):
        a, b = single[name].state_dict(), ref[name].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert single["tokenizer_2"](PROMPT).input_ids == ref["tokenizer_2"](PROMPT).input_ids
    pipes = [Pipeline.from_pretrained(path, config=folder), Pipeline.from_pretrained(folder)]
    for pipe in pipes:
        assert isinstance(pipe, SDXLPipeline)
        pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, seed=3, output_type="latent", original_size=(96, 80))
    assert torch.equal(pipes[0](PROMPT, **kw), pipes[1](PROMPT, **kw))
    assert native_size(path, folder) == (64, 4) and native_size(path) == (1024, 8)  # tiny configs; shipped SDXL


def test_an_sdxl_file_with_another_kinds_configs_is_one_line(sdxl_file, files, offline):
    with pytest.raises(EngineError, match="is an SDXL checkpoint but the config folder .* is not an SDXL one") as e:
        load_base(sdxl_file, torch.float32, config=folder_of(files["sd15"]))
    one_line(e, sdxl_file)
    with pytest.raises(EngineError, match="is an SD1.5-layout checkpoint but the config folder .* is an SDXL one"):
        load_base(files["sd15"], torch.float32, config=folder_of(sdxl_file))
    assert config_folder(sdxl_file, "sdxl") == os.path.join(CONFIGS, "sdxl")
    with pytest.raises(EngineError, match=r"UNet: \d+ mis-shaped \(add_embedding.linear_1.bias \(128,\) vs "
                                          r"\(1280,\).*; second text encoder: \d+ mis-shaped") as e:
        load_base(sdxl_file, torch.float32)  # the shipped (full-size) SDXL configs
    one_line(e, sdxl_file, os.path.join(CONFIGS, "sdxl"), "config=")


def test_an_sdxl_inpainting_file_is_refused_in_one_line(sdxl_file, tmp_path):
    sd = load_file(sdxl_file)
    conv = UNET + "input_blocks.0.0.weight"
    sd[conv] = torch.ones(sd[conv].shape[0], 9, 3, 3)
    path = str(tmp_path / "sdxl-inpaint.safetensors")
    save_file(sd, path)
    with pytest.raises(EngineError, match="SDXL inpainting single files are not supported: load its diffusers folder"):
        load_base(path, torch.float32)


def test_the_shipped_sdxl_configs_at_full_size():
    """On the meta device: SDXL base 1.0's public parameter counts, and an SDXL-shaped original file's keys (what
    sgm_state_dict writes: label_emb, conditioner.embedders.0/1) are exactly what the shipped configs expect."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ipadapter_instruct.engine.model_folders import folder_scheduler
    from ipadapter_instruct.engine.tiny import sgm_state_dict

    folder = os.path.join(CONFIGS, "sdxl")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2"))
    count = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text, text_2)]
    assert count == [2_567_463_684, 83_653_863, 123_060_480, 694_659_840]
    assert vae.config.scaling_factor == 0.13025 and unet.config.addition_embed_type == "text_time"
    shapes = {k: tuple(v.shape) for k, v in sgm_state_dict(unet, vae, text, text_2).items()}
    assert shapes["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert checkpoint_kind("sdxl.safetensors", shapes) == "sdxl"
    check_checkpoint_keys("sdxl.safetensors", shapes, folder, shipped=True)
    assert type(folder_scheduler(folder)).__name__ == "EulerDiscreteScheduler"
