"""Tiny random parts that fit a tiny model (engine/tiny.py), in the formats users download them in, so ControlNet and
LoRA can be tried as the docs write them and tested without a download.

    tiny_controlnet(DIR/controlnet, unet)       a diffusers ControlNetModel folder (config.json and
                                                diffusion_pytorch_model.safetensors), ControlNetModel.from_unet's
    tiny_lora(DIR/lora.safetensors, DIR/model)  a LoRA of the UNet and text encoder(s) in diffusers' file layout
                                                (what `save_lora_weights` writes and `--lora FILE:SCALE` loads)

`python -m engine make-tiny DIR` writes both beside the model (not with --edit: no ControlNet for InstructPix2Pix).
"""
from __future__ import annotations

import os

import torch

LORA_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj", "ff.net.2")
LORA_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def tiny_controlnet(folder: str, unet, seed: int = 0) -> str:
    """A random ControlNet for `unet` (a UNet2DConditionModel; SDXL's gives an SDXL net, reading the added
    conditioning) saved as diffusers' ControlNetModel folder. An inpainting UNet's net reads the latents alone (4
    channels, as diffusers' ControlNet inpainting pipelines feed it): its input conv is the UNet's first 4. -> folder."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    # the conditioning embedding halves twice: the tiny VAE's factor is 4 (SD1.5's three times, for 8)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32))
    latents = unet.config.out_channels
    if unet.config.in_channels != latents:
        state = {k: v[:, :latents] if k == "conv_in.weight" else v for k, v in net.state_dict().items()}
        net = ControlNetModel.from_config({**net.config, "in_channels": latents})
        net.load_state_dict(state)
    with torch.no_grad():  # a trained net's zero convolutions are not zero: make them matter
        for n, p in net.named_parameters():
            if "controlnet_down_blocks" in n or "controlnet_mid_block" in n or "conv_out" in n:
                p.normal_(0, 0.05)
    net.save_pretrained(os.fspath(folder))
    return os.fspath(folder)


def tiny_lora(path: str, model: str, seed: int = 0, unet_targets=LORA_UNET_TARGETS) -> str:
    """A random rank-4 LoRA (alpha = rank) of the UNet and text encoder(s) of the diffusers folder `model` (an SDXL
    one: both encoders), written at `path` in diffusers' file layout (unet.*, text_encoder.*, text_encoder_2.*).
    -> path."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    sdxl = os.path.isdir(os.path.join(model, "text_encoder_2"))
    models = {"unet": UNet2DConditionModel.from_pretrained(model, subfolder="unet"),
              "text_encoder": CLIPTextModel.from_pretrained(model, subfolder="text_encoder")}
    if sdxl:
        models["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2")
    for name, m in models.items():
        targets = unet_targets if name == "unet" else LORA_TEXT_TARGETS
        models[name] = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=list(targets)), m)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in models.values():
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * (0.2 if "lora_B" in n else 0.5))
    layers = {f"{name}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(m))
              for name, m in models.items()}
    folder, weight_name = os.path.split(os.path.abspath(os.fspath(path)))
    (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).save_lora_weights(
        folder, **layers, weight_name=weight_name)
    return os.path.join(folder, weight_name)


PARTS = {"controlnet": "controlnet", "lora": "lora.safetensors"}  # name -> where it lies beside model/


def write_tiny_parts(folder: str, unet, seed: int, controlnet: bool, lora: bool) -> list[str]:
    """The parts asked for, for the model at folder/model (its `unet` loaded), each from its own seed so the other
    pieces stay what they were, at folder/PARTS[name]. -> the names written."""
    if controlnet:
        tiny_controlnet(os.path.join(folder, PARTS["controlnet"]), unet, seed)
    if lora:
        tiny_lora(os.path.join(folder, PARTS["lora"]), os.path.join(folder, "model"), seed)
    return [name for name, wanted in (("controlnet", controlnet), ("lora", lora)) if wanted]


def ip2p_pipeline(unet, vae, text, tok, inpaint=False):
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    scheduler = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                num_train_timesteps=1000, steps_offset=1)
    return StableDiffusionInstructPix2PixPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                                  scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False)


def sd_pipeline(unet, vae, text, tok, inpaint=False):
    """A diffusers StableDiffusion(Inpaint)Pipeline around these modules with SD1.5's PNDM scheduler config."""
    from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline

    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    kind = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
    return kind(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)
