"""Weights for the end-to-end benchmark, in the real on-disk formats, built once into a cache.

- `tiny`: the demo's tiny random weights, plus an IP-Adapter+ file for the diffusers provider.
- `sd15`: random weights at the full SD1.5 / CLIP ViT-H/14 / 16-token adapter shapes (UNet 860 M, VAE 84 M,
  text encoder 123 M, image encoder 632 M, projector 68.9 M parameters), stored in fp16 (~3.4 GB). Random
  weights do the same work as real ones, so the timings hold; the images are noise.
- `sdxl`: random weights at SDXL base 1.0's shapes (UNet 2.57 B, two text encoders 123 M + 695 M, VAE 84 M) with
  ViT-H/14 and IPAdapter-Instruct SDXL / IP-Adapter+ SDXL adapters, fp16 (~9 GB); `tiny-sdxl`: the tiny SDXL
  weights (engine.tiny.make_tiny_sdxl) with a tiny Instruct adapter.
- Real weights: `--model/--image-encoder/--adapter` (and `--plus-adapter` for the diffusers provider).
The edit task (InstructPix2Pix) has its own: `tiny` is `make_tiny(DIR, edit=True)`, `sd15` the SD1.5 UNet with
8 input channels (859.5 M) and the same VAE and text encoder, with timbrooks/instruct-pix2pix's Euler ancestral
scheduler, in diffusers' StableDiffusionInstructPix2PixPipeline layout (fp16, ~2.1 GB).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ipadapter_instruct.bench.e2e_config import PRESETS  # noqa: F401 (this module's API)


def cache_root() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "ipadapter-instruct-engine")


def sd15_modules(edit: bool = False, channels: int | None = None):
    """SD1.5's UNet, VAE and text encoder and CLIP ViT-H/14's vision tower with random weights (any device
    context: the tests build them on the meta device). edit: InstructPix2Pix's UNet (8 input channels: the noisy
    latent and the photo's), and no vision tower (None); channels: the UNet's input channels (9: inpainting)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    # diffusers' defaults are SD1.5's
    unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64, in_channels=channels or (8 if edit else 4))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", projection_dim=768))
    if edit:
        return unet, vae, text, None
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
        patch_size=14, projection_dim=1024, hidden_act="gelu"))
    return unet, vae, text, vision


def sdxl_modules():
    """SDXL base 1.0's UNet, VAE and two text encoders (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 with its
    projection) with random weights, plus CLIP ViT-H/14's vision tower (any device context: the tests build them on
    the meta device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, sample_size=1024, scaling_factor=0.13025)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", projection_dim=768))
    text2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=1280))
    return unet, vae, text, text2, _vit_h()


def _vit_h():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
        patch_size=14, projection_dim=1024, hidden_act="gelu"))


def build_sdxl(folder: str) -> None:
    """Write random SDXL-shaped weights to `folder`: model/ (a StableDiffusionXLPipeline folder, fp16),
    image_encoder/ (ViT-H/14), adapter.safetensors (IPAdapter-Instruct SDXL: 1280 wide, 20 heads, 16 queries,
    768-wide text, 2048 out) and plus.safetensors (IP-Adapter+ SDXL), all fp16: about 9 GB."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from ipadapter_instruct.engine.adapter import AdapterLayers, save_adapter
    from ipadapter_instruct.engine.loading import _image_processor_class
    from ipadapter_instruct.engine.projector import InstructProjector, ProjectorConfig
    from ipadapter_instruct.engine.tiny import atomic_folder, tiny_tokenizer

    from ipadapter_instruct.bench.common import quiet_loaders

    quiet_loaders()
    with atomic_folder(folder) as tmp:
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float16)  # built in fp16 (fp32 would need ~16 GB before the cast)
        try:
            unet, vae, text, text2, vision = sdxl_modules()
        finally:
            torch.set_default_dtype(default)
        with tempfile.TemporaryDirectory() as tok_dir:
            tok = tiny_tokenizer(tok_dir)  # byte-level: any text, 77 tokens, ids within CLIP's vocabulary
        for t in (text, text2):
            t.config.bos_token_id, t.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
        sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
        StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text2, tokenizer=tok, tokenizer_2=tok,
                                  unet=unet, scheduler=sched).to(torch.float16).save_pretrained(
            os.path.join(tmp, "model"))
        vision.to(torch.float16).save_pretrained(os.path.join(tmp, "image_encoder"))
        _image_processor_class()().save_pretrained(os.path.join(tmp, "image_encoder"))
        for name, text_dim in (("adapter.safetensors", 768), ("plus.safetensors", None)):
            cfg = ProjectorConfig(dim=1280, depth=4, heads=20, num_queries=16, image_dim=1280, output_dim=2048,
                                  ff_mult=4, text_dim=text_dim)
            save_adapter(os.path.join(tmp, name), InstructProjector(cfg).half(), AdapterLayers(unet, 2048).half())


def _write_adapter(path: str, unet, preset: str) -> None:
    from ipadapter_instruct.engine.adapter import AdapterLayers, save_adapter
    from ipadapter_instruct.engine.projector import InstructProjector, ProjectorConfig

    save_adapter(path, InstructProjector(ProjectorConfig.preset(preset)), AdapterLayers(unet, 768))


def build_sd15(folder: str) -> None:
    """Write random SD1.5-shaped weights to `folder` (model/, image_encoder/, adapter + plus adapter)."""
    from ipadapter_instruct.engine.loading import _image_processor_class
    from ipadapter_instruct.engine.tiny import atomic_folder, sd_pipeline, tiny_tokenizer

    from ipadapter_instruct.bench.common import quiet_loaders

    quiet_loaders()
    with atomic_folder(folder) as tmp:
        torch.manual_seed(0)
        unet, vae, text, vision = sd15_modules()
        with tempfile.TemporaryDirectory() as tok_dir:
            tok = tiny_tokenizer(tok_dir)  # byte-level: any text, 77 tokens, ids within SD1.5's vocabulary
        text.config.bos_token_id, text.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
        sd_pipeline(unet, vae, text, tok).to(torch.float16).save_pretrained(os.path.join(tmp, "model"))
        vision.to(torch.float16).save_pretrained(os.path.join(tmp, "image_encoder"))
        _image_processor_class()().save_pretrained(os.path.join(tmp, "image_encoder"))  # CLIP's 224 px defaults
        _write_adapter(os.path.join(tmp, "adapter.safetensors"), unet, "sd15")
        _write_adapter(os.path.join(tmp, "plus.safetensors"), unet, "sd15-plus")


def build_sd15_edit(folder: str) -> None:
    """Write random SD1.5-shaped InstructPix2Pix weights to `folder`/model (diffusers' IP2P layout)."""
    from ipadapter_instruct.engine.tiny import atomic_folder, ip2p_pipeline, tiny_tokenizer

    from ipadapter_instruct.bench.common import quiet_loaders

    quiet_loaders()
    with atomic_folder(folder) as tmp:
        torch.manual_seed(0)
        unet, vae, text, _ = sd15_modules(edit=True)
        with tempfile.TemporaryDirectory() as tok_dir:
            tok = tiny_tokenizer(tok_dir)
        text.config.bos_token_id, text.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
        ip2p_pipeline(unet, vae, text, tok).to(torch.float16).save_pretrained(os.path.join(tmp, "model"))


def edit_weights(preset: str, root: str) -> dict[str, str]:
    """The edit task's InstructPix2Pix model folder, built once."""
    from ipadapter_instruct.engine.tiny import make_tiny

    if preset == "tiny":
        folder = os.path.join(root, "tiny-edit-v1")
        if not os.path.isdir(folder):  # make_tiny replaces the folder atomically: there means complete
            make_tiny(folder, edit=True)
        return {"model": os.path.join(folder, "model")}
    folder = os.path.join(root, "sd15-ip2p-random-v1")
    if not os.path.isdir(folder):
        print(f"building random SD1.5-shaped InstructPix2Pix weights into {folder} (once, ~2.1 GB)", flush=True)
        build_sd15_edit(folder)
    return {"model": os.path.join(folder, "model")}


def inpaint_model(preset: str, root: str) -> str:
    """The inpaint task's model folder (a 9-channel UNet: latents, mask, masked-photo latent), built once: the
    tiny one (engine.tiny's), or SD1.5's shapes with random weights in diffusers' StableDiffusionInpaintPipeline
    layout (fp16, ~2.1 GB)."""
    from ipadapter_instruct.engine.tiny import atomic_folder, make_tiny, sd_pipeline, tiny_tokenizer

    if preset == "tiny":
        folder = os.path.join(root, "tiny-inpaint-v1")
        if not os.path.isdir(folder):  # make_tiny replaces the folder atomically: there means complete
            make_tiny(folder, inpaint=True)
        return os.path.join(folder, "model")
    folder = os.path.join(root, "sd15-inpaint-random-v1")
    if not os.path.isdir(folder):
        print(f"building random SD1.5-shaped inpainting weights into {folder} (once, ~2.1 GB)", flush=True)
        with atomic_folder(folder) as tmp:
            torch.manual_seed(0)
            unet, vae, text, _ = sd15_modules(edit=True, channels=9)
            with tempfile.TemporaryDirectory() as tok_dir:
                tok = tiny_tokenizer(tok_dir)
            text.config.bos_token_id, text.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
            sd_pipeline(unet, vae, text, tok, inpaint=True).to(torch.float16).save_pretrained(os.path.join(tmp, "model"))
    return os.path.join(folder, "model")


def native_size(model: str) -> int:
    """A diffusers model folder's native output size in pixels: the UNet's sample size times the VAE's factor."""
    import json

    unet, vae = (json.loads(Path(model, sub, "config.json").read_text()) for sub in ("unet", "vae"))
    return unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)


def bench_weights(preset: str, cache: str | None = None, task: str = "generate") -> dict[str, str]:
    """Paths of model, image_encoder, adapter (instruct) and plus_adapter (IP-Adapter+), built once; for the
    edit task the InstructPix2Pix model alone."""
    from diffusers import UNet2DConditionModel

    from ipadapter_instruct.engine.demo import ensure_tiny

    root = cache or cache_root()
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if task == "edit":
        return edit_weights(preset, root)
    if task == "inpaint":  # generate's image encoder and adapters (they fit any UNet of these attention shapes)
        return {**bench_weights(preset, cache), "model": inpaint_model(preset, root)}
    if preset in ("tiny-sdxl", "sdxl"):
        return sdxl_weights(preset, root)
    if preset == "tiny":
        paths = ensure_tiny(os.path.join(root, "tiny-v1"))
        plus = os.path.join(root, "tiny-v1-plus.safetensors")
        if not os.path.exists(plus):
            from ipadapter_instruct.engine.tiny import tiny_adapter
            torch.manual_seed(1)
            unet = UNet2DConditionModel.from_pretrained(paths["model"], subfolder="unet")
            tiny_adapter(plus, unet, kind="plus")  # written atomically
        return {**paths, "plus_adapter": plus}
    folder = os.path.join(root, "sd15-random-v1")
    if not os.path.isdir(folder):
        print(f"building random SD1.5-shaped weights into {folder} (once, ~3.4 GB)", flush=True)
        build_sd15(folder)
    return preset_paths(folder)


def sdxl_weights(preset: str, root: str) -> dict[str, str]:
    """The SDXL presets, built once: `tiny-sdxl` (engine.tiny.make_tiny_sdxl) and `sdxl` (build_sdxl: the public
    shapes). adapter: IPAdapter-Instruct; plus_adapter: IP-Adapter+."""
    if preset == "tiny-sdxl":
        from ipadapter_instruct.engine.tiny import make_tiny_sdxl
        folder = os.path.join(root, "tiny-sdxl-v1")
        if not os.path.isdir(folder):  # make_tiny_sdxl replaces the folder atomically: there means complete
            make_tiny_sdxl(folder)
        return preset_paths(folder, "instruct.safetensors")
    folder = os.path.join(root, "sdxl-random-v1")
    if not os.path.isdir(folder):
        print(f"building random SDXL-shaped weights into {folder} (once, ~9 GB)", flush=True)
        build_sdxl(folder)
    return preset_paths(folder)


def preset_paths(folder: str, adapter: str = "adapter.safetensors") -> dict[str, str]:
    """A built preset's paths: model/, image_encoder/, the Instruct adapter and plus.safetensors."""
    return {"model": os.path.join(folder, "model"), "image_encoder": os.path.join(folder, "image_encoder"),
            "adapter": os.path.join(folder, adapter), "plus_adapter": os.path.join(folder, "plus.safetensors")}
