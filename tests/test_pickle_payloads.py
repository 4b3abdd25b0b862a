"""No file runs code: a weights file whose pickle would call os.system, saved where each loader reads it (adapter
.bin, single-file .ckpt, the trainer's step-N.pt, a LoRA .bin, a diffusers folder's .bin, a ControlNet folder's
.bin, an image encoder's pytorch_model.bin), is refused with one line naming the file, and the command never runs.

Each payload is first shown to be live: an unsafe torch.load (weights_only=False) of it does run the command."""
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ipadapter_instruct.engine.errors import EngineError


class Payload:
    """Unpickled by a code-running unpickler, it touches `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "payload-ran"


def plant(path, state: dict, marker) -> str:
    """torch.save `state` with the payload under one more key; checks the payload runs when loaded unsafely."""
    torch.save({**state, "payload": Payload(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.exists(), "the payload should run under an unsafe load"
    marker.unlink()
    return str(path)


def refused(message: str, path, marker) -> None:
    assert len(message.strip().splitlines()) == 1, message
    assert os.fspath(path) in message and "posix.system" in message and "refused" in message, message
    assert not marker.exists(), "the payload ran"


def test_adapter_bin(tiny, tmp_path, marker):
    from ipadapter_instruct.engine.adapter import read_adapter_file

    image_proj, ip_adapter = read_adapter_file(tiny["adapter"])
    path = plant(tmp_path / "adapter.bin", {"image_proj": image_proj, "ip_adapter": ip_adapter}, marker)
    with pytest.raises(EngineError) as e:
        read_adapter_file(path)
    refused(str(e.value), path, marker)


def test_single_file_ckpt(tmp_path, marker):
    from ipadapter_instruct.engine import Pipeline

    path = plant(tmp_path / "model.ckpt", {"state_dict": {"model.x": torch.zeros(2)}}, marker)
    with pytest.raises(EngineError) as e:
        Pipeline.from_pretrained(path, device="cpu")
    refused(str(e.value), path, marker)


def test_trainer_resume(tiny, tmp_path, marker, capsys):
    from ipadapter_instruct.train.__main__ import main
    from ipadapter_instruct.train.data import make_synthetic

    data = make_synthetic(str(tmp_path / "data"), 4, seed=0, size=32)
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    path = plant(out / "checkpoints" / "step-99999999.pt", {"step": 1}, marker)
    code = main(["--model", tiny["model"], "--image-encoder", tiny["image_encoder"], "--data", data, "--out",
                 str(out), "--steps", "1", "--batch-size", "2", "--val-fraction", "0", "--resolution", "32",
                 "--no-progress", "--device", "cpu", "--resume"])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (after transformers' loading bar)
    assert code == 1 and last.startswith("python -m train: error: cannot read checkpoint ")
    refused(last, path, marker)


def test_lora_bin(instruct_pipe, tmp_path, marker):
    path = plant(tmp_path / "lora.bin", {"unet.down.lora_A.weight": torch.zeros(2, 2)}, marker)
    with pytest.raises(EngineError) as e:
        instruct_pipe.load_lora_weights(path)
    refused(str(e.value), path, marker)
    assert instruct_pipe.loras == {}


def swap_for_bin(folder, safetensors_name: str, bin_name: str, marker) -> str:
    """The folder's weights as a .bin with the payload beside them (the .safetensors removed, so loaders fall back
    to the pickle, as they do for older folders)."""
    src = os.path.join(folder, safetensors_name)
    state = load_file(src)
    os.remove(src)
    return plant(os.path.join(folder, bin_name), state, marker)


def test_model_folder_bin(tiny, tmp_path, marker):
    from ipadapter_instruct.engine import Pipeline

    model = tmp_path / "model"
    shutil.copytree(tiny["model"], model)
    path = swap_for_bin(model / "unet", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", marker)
    with pytest.raises(EngineError) as e:
        Pipeline.from_pretrained(str(model), device="cpu")
    refused(str(e.value), path, marker)


def test_image_encoder_bin(tiny, tmp_path, marker):
    from ipadapter_instruct.engine import Pipeline

    encoder = tmp_path / "image_encoder"
    shutil.copytree(tiny["image_encoder"], encoder)
    path = swap_for_bin(encoder, "model.safetensors", "pytorch_model.bin", marker)
    with pytest.raises(EngineError) as e:
        Pipeline.from_pretrained(tiny["model"], image_encoder=str(encoder), adapter=tiny["adapter"], device="cpu")
    refused(str(e.value), path, marker)


def test_controlnet_folder_bin(tiny, tmp_path, marker):
    from diffusers import ControlNetModel, UNet2DConditionModel

    from ipadapter_instruct.engine.controlnet import load_controlnets

    unet = UNet2DConditionModel.from_pretrained(tiny["model"], subfolder="unet")
    folder = tmp_path / "controlnet"
    ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32)).save_pretrained(folder)
    path = swap_for_bin(folder, "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", marker)
    with pytest.raises(EngineError) as e:
        load_controlnets(str(folder), unet, torch.float32)
    refused(str(e.value), path, marker)
