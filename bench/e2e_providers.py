"""The providers of `python -m bench e2e`, each one way to answer the same request: `engine` and its ladder steps
(EngineProvider), `tensorrt` (the engine's loop around TensorRT plans), `diffusers` (DiffusersProvider). A provider
is called with (condition image, batch) and reports its per-stage times (`stages`); `load_provider` picks one by
name, or says why it cannot run here."""
from __future__ import annotations

import os
import shutil
import time

import numpy as np
import torch
from PIL import Image

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.loading import _image_processor_class, is_sdxl_folder, make_scheduler, native_from_configs
from ipadapter_instruct.engine.trt import choice_of, load_tensorrt

from ipadapter_instruct.bench.e2e_config import EDIT_PROMPT, INSTRUCT, NEGATIVE, PROMPT, E2EConfig, fast_path


def stripe_masks(n: int, height: int, width: int) -> list:
    """n masks, mask i white on the i-th of n vertical stripes (diffusers' IPAdapterMaskProcessor input)."""
    out = []
    for i in range(n):
        m = np.zeros((height, width), dtype=np.uint8)
        m[:, i * width // n:(i + 1) * width // n] = 255
        out.append(Image.fromarray(m))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EngineProvider:
    def __init__(self, name: str, paths: dict, device: torch.device, dtype: torch.dtype, cfg: E2EConfig):
        from ipadapter_instruct.engine import fastpath  # deferred: loads torch and the kernels
        from ipadapter_instruct.engine.registry import EngineConfig, load_pipeline

        self.name, self.cfg = name, cfg
        # engine-lcm: what an LCM-LoRA user runs, few steps with the LCM scheduler (the weights are the same: random
        # weights do the same work per step whatever they are)
        self.steps, self.scheduler = (cfg.few_steps, "lcm") if name == "engine-lcm" else (cfg.steps, cfg.scheduler)
        fast = fast_path(name, device, cfg)
        backend = "sdpa" if not fast.fused_attention else "auto" if name in ("engine", "engine-lcm") else "triton"
        adapters = {} if cfg.task == "edit" else dict(  # InstructPix2Pix: no adapter
            image_encoder=paths["image_encoder"], adapter=(paths["adapter"],) * cfg.adapters)
        dtype = torch.bfloat16 if fast.bf16 else dtype
        self.pipe = load_pipeline(EngineConfig(
            paths["model"], **adapters, device=str(device), dtype=str(dtype).removeprefix("torch."),
            attention_backend=backend, kind="edit" if cfg.task == "edit" else None,
            channels_last=fast.channels_last, compile=fast.compile, cuda_graphs=fast.cuda_graphs))
        if fast.fused_attention and not fast.fused_norms:  # (a ladder step: fused attention, eager norms)
            for m in (self.pipe.unet, self.pipe.vae):
                fastpath.unfuse(m)
        self.pipe.set_progress_bar_config(disable=True)
        self.unet = self.pipe.unet

    def __call__(self, image, batch: int, output_type: str = "pil"):
        c = self.cfg
        if c.task == "edit":
            args = dict(edit_args(c, image, batch), num_inference_steps=self.steps, scheduler=self.scheduler)
            return self.pipe(**args, seed=list(range(batch)), output_type=output_type)
        several = {}
        if c.adapter_masks:
            native, _ = native_from_configs(self.pipe.unet.config, self.pipe.vae.config)
            several["adapter_masks"] = [stripe_masks(c.adapters, c.height or native, c.width or native)] * batch
        if c.task in ("img2img", "inpaint"):
            native, _ = native_from_configs(self.pipe.unet.config, self.pipe.vae.config)
            photos, mask = start_inputs(c, native, batch)
            several.update(init_image=photos, strength=c.strength, mask_image=None if mask is None else [mask] * batch)
        return self.pipe(prompt=[PROMPT] * batch, image=[image] * batch, instruct=[INSTRUCT] * batch,
                         negative_prompt=[NEGATIVE] * batch, scale=c.scale, guidance_scale=c.guidance_scale, **several,
                         guidance_mode=c.guidance_mode, num_inference_steps=self.steps, height=c.height,
                         width=c.width, seed=list(range(batch)), output_type=output_type, scheduler=self.scheduler)

    def stages(self, wall_ms: float) -> dict[str, float]:
        """The last call's stages, and `other`: its wall time `wall_ms` less the named stages (the whole denoising
        loop, scheduler and guidance included, counts as named)."""
        t = self.pipe.timings
        keys = ("text_encoder_ms", "image_encoder_ms", "image_latent_ms", "projector_ms", "kv_ms", "unet_ms_per_step",
                "vae_decode_ms")
        named = ("text_encoder_ms", "image_encoder_ms", "image_latent_ms", "projector_ms", "kv_ms", "denoise_ms",
                 "vae_decode_ms")
        return {**{k: t[k] for k in keys if k in t}, "other_ms": wall_ms - sum(t.get(k, 0.0) for k in named)}


def build_engines_once(paths: dict, dtype: str, device: torch.device, log=print, trt: str = "auto") -> str:
    """The weights' TensorRT plans in the bench cache (export, then build with `trt` for this GPU's compute
    capability), made once per TensorRT and dtype."""
    from ipadapter_instruct.export.onnx import export_onnx  # deferred: the export path (the tensorrt provider only)
    from ipadapter_instruct.export.trt import build_engines

    made_by = choice_of(load_tensorrt(trt))  # plans of one TensorRT do not load in the other
    root = os.path.join(os.path.dirname(os.path.abspath(paths["model"])), f"trt-{made_by}-{dtype}")
    if os.path.isfile(os.path.join(root, "engines", "engines.json")):
        return os.path.join(root, "engines")
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    export_onnx(paths["model"], paths["image_encoder"], paths["adapter"], os.path.join(root, "onnx"), dtype=dtype,
                device=device.type, log=lambda *a: None)
    major, minor = torch.cuda.get_device_capability(device)
    build_engines(os.path.join(root, "onnx"), os.path.join(root, "engines"), archs=(major * 10 + minor,),
                  log=lambda *a: None, trt=made_by)
    log(f"tensorrt: exported and built the plans in {time.perf_counter() - t0:.0f} s ({root})")
    return os.path.join(root, "engines")


class TensorRTProvider(EngineProvider):
    """The engine's loop around the TensorRT plans (engine.trt.runtime.TensorRTPipeline)."""

    def __init__(self, paths: dict, device: torch.device, dtype: torch.dtype, cfg: E2EConfig, log=print):
        from ipadapter_instruct.engine.registry import EngineConfig, load_pipeline  # deferred: the pipeline loads diffusers

        self.name, self.cfg = "tensorrt", cfg
        engines = cfg.engines or build_engines_once(paths, str(dtype).removeprefix("torch."), device, log, cfg.trt)
        self.pipe = load_pipeline(EngineConfig(paths["model"], image_encoder=paths["image_encoder"],
                                               device=str(device), backend="tensorrt", engines=engines, trt=cfg.trt,
                                               cuda_graphs=cfg.cuda_graphs))
        self.pipe.set_progress_bar_config(disable=True)
        self.unet = None


class DiffusersProvider:
    name = "diffusers"

    def __init__(self, paths: dict, device: torch.device, dtype: torch.dtype, cfg: E2EConfig):
        # deferred: diffusers and transformers load only for the diffusers provider
        from diffusers import (StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                               StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline)
        from transformers import CLIPVisionModelWithProjection

        self.cfg, self.device = cfg, device
        if cfg.task == "edit":
            self.pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
                paths["model"], safety_checker=None, requires_safety_checker=False)
        else:
            encoder = CLIPVisionModelWithProjection.from_pretrained(paths["image_encoder"]).to(dtype)
            extractor = _image_processor_class().from_pretrained(paths["image_encoder"])
            if is_sdxl_folder(paths["model"]):  # the SDXL presets: diffusers' SDXL pipeline, IP-Adapter+ SDXL
                from diffusers import StableDiffusionXLPipeline  # deferred: as above
                self.pipe = StableDiffusionXLPipeline.from_pretrained(paths["model"], image_encoder=encoder,
                                                                      feature_extractor=extractor)
            else:
                cls = {"img2img": StableDiffusionImg2ImgPipeline, "inpaint": StableDiffusionInpaintPipeline}
                self.pipe = cls.get(cfg.task, StableDiffusionPipeline).from_pretrained(
                    paths["model"], safety_checker=None, requires_safety_checker=False, image_encoder=encoder,
                    feature_extractor=extractor)
            plus, n = paths["plus_adapter"], cfg.adapters
            if n == 1:
                self.pipe.load_ip_adapter(os.path.dirname(plus), subfolder="", weight_name=os.path.basename(plus),
                                          image_encoder_folder=None)
            else:
                self.pipe.load_ip_adapter([os.path.dirname(plus)] * n, subfolder=[""] * n,
                                          weight_name=[os.path.basename(plus)] * n, image_encoder_folder=None)
            self.pipe.set_ip_adapter_scale(cfg.scale if n == 1 else [cfg.scale] * n)
        self.pipe.to(device=device, dtype=dtype)  # (not torch_dtype=: deprecated in newer diffusers)
        if cfg.scheduler:  # the same scheduler class on both sides, from the model's own config
            self.pipe.scheduler = make_scheduler(self.pipe.scheduler, cfg.scheduler)
        self.pipe.set_progress_bar_config(disable=True)
        self.unet = self.pipe.unet
        self._times: dict[str, float] = {}
        self._hooks(device)

    def _hooks(self, device):
        # per-module wall time (synchronised) for the stage breakdown, and a profiler range named as the engine's
        # stages ("diffusers::projector", ...); the projector runs inside every UNet call
        p = self.pipe
        ranges = {}
        for key, module in (("text_encoder_ms", p.text_encoder), ("image_encoder_ms", p.image_encoder),
                            ("image_latent_ms", p.vae.encoder), ("projector_ms", p.unet.encoder_hid_proj),
                            ("unet_ms", p.unet), ("vae_decode_ms", p.vae.decoder)):
            if module is None:  # IP2P: no image encoder, no projector
                continue
            def pre(_m, _a, key=key):
                stage = "unet_step" if key == "unet_ms" else key.removesuffix("_ms")
                ranges[key] = torch.profiler.record_function("diffusers::" + stage)
                ranges[key].__enter__()
                sync(device)
                self._times[key + "_start"] = time.perf_counter()

            def post(_m, _a, _o, key=key):
                sync(device)
                self._times[key] = self._times.get(key, 0.0) + (time.perf_counter() - self._times[key + "_start"]) * 1e3
                if key == "unet_ms":
                    self._times["unet_calls"] = self._times.get("unet_calls", 0) + 1
                ranges.pop(key).__exit__(None, None, None)
            module.register_forward_pre_hook(pre)
            module.register_forward_hook(post)

    def __call__(self, image, batch: int):
        c = self.cfg
        self._times.clear()
        gens = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
        if c.task == "edit":
            return self.pipe(**edit_args(c, image, batch), generator=gens).images
        extra = {}
        if c.adapter_masks:
            from diffusers.image_processor import IPAdapterMaskProcessor  # deferred: as in __init__
            size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
            h, w = c.height or size, c.width or size
            masks = IPAdapterMaskProcessor().preprocess(stripe_masks(c.adapters, h, w), height=h, width=w)
            extra["cross_attention_kwargs"] = {"ip_adapter_masks": [masks[i:i + 1] for i in range(c.adapters)]}
        if c.task in ("img2img", "inpaint"):  # (diffusers' img2img takes no height/width: the photo's size is it)
            photos, mask = start_inputs(c, self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor, batch)
            extra.update(image=photos, **({} if c.strength is None else {"strength": c.strength}))
            if mask is not None:
                extra.update(mask_image=[mask] * batch, height=c.height, width=c.width)
            return self.pipe(prompt=[PROMPT] * batch, negative_prompt=[NEGATIVE] * batch, ip_adapter_image=image,
                             guidance_scale=c.guidance_scale, num_inference_steps=c.steps, generator=gens,
                             **extra).images
        return self.pipe(prompt=[PROMPT] * batch, negative_prompt=[NEGATIVE] * batch,
                         ip_adapter_image=image if c.adapters == 1 else [image] * c.adapters,
                         guidance_scale=c.guidance_scale, num_inference_steps=c.steps, height=c.height,
                         width=c.width, generator=gens, **extra).images

    def stages(self, wall_ms: float) -> dict[str, float]:
        """The last call's hooked modules, and `other`: its wall time `wall_ms` less them (the projector runs inside
        the UNet calls, so it is not counted twice; the scheduler's steps and the guidance sums fall in `other`)."""
        out = {k: v for k, v in self._times.items() if not k.endswith("_start") and k != "unet_calls"}
        out["other_ms"] = wall_ms - sum(v for k, v in out.items() if k != "projector_ms")
        if "unet_ms" in out:  # per UNet call, as the engine's (a strength runs fewer steps; PNDM one more)
            out["unet_ms_per_step"] = out.pop("unet_ms") / max(self._times.get("unet_calls", self.cfg.steps), 1)
        out["other_ms"] = out.pop("other_ms")  # (last, as in the engine's)
        return out


def start_inputs(cfg: E2EConfig, native: int, batch: int) -> tuple[list, object]:
    """The img2img / inpaint tasks' photos (one copy per request: the engine would encode a photo shared by
    requests once, diffusers encodes each) at the output size, and the inpaint task's mask (white: a centred
    rectangle to repaint) or None."""
    from ipadapter_instruct.engine.demo import draw_condition_image  # deferred: as the pipelines

    size = (cfg.width or native, cfg.height or native)
    photo = draw_condition_image(256).transpose(Image.Transpose.ROTATE_90).resize(size, Image.BICUBIC)
    mask = None
    if cfg.task == "inpaint":
        m = np.zeros((size[1], size[0]), dtype=np.uint8)
        m[size[1] // 4:3 * size[1] // 4, size[0] // 4:3 * size[0] // 4] = 255
        mask = Image.fromarray(m)
    return [photo] + [photo.copy() for _ in range(batch - 1)], mask


def edit_args(cfg: E2EConfig, image, batch: int) -> dict:
    """The edit task's request for both sides: one photo per request (copies: the engine would encode a photo
    shared by requests once), at the output size (the photo's size is IP2P's output size, as in diffusers)."""
    return dict(prompt=[EDIT_PROMPT] * batch, image=[image] + [image.copy() for _ in range(batch - 1)],
                guidance_scale=cfg.guidance_scale, image_guidance_scale=cfg.image_guidance_scale,
                num_inference_steps=cfg.steps)


def load_provider(name: str, paths: dict, device: torch.device, dtype: torch.dtype, cfg: E2EConfig, log=print):
    """The provider `name` loaded, or None where it cannot run here (logged as skipped, with the reason)."""
    reason = None if name in ("diffusers", "engine", "engine-lcm", "tensorrt") else \
        fast_path(name, device, cfg).unavailable(device)
    if name == "tensorrt" and device.type != "cuda":
        reason = f"TensorRT engines run on a CUDA GPU; this run is on {device}"
    if reason:
        log(f"{name}: skipped: {reason}")
        return None
    if name == "tensorrt":
        try:
            return TensorRTProvider(paths, device, dtype, cfg, log)
        except EngineError as e:  # TensorRT missing, or its own refusal of the plans on this GPU
            log(f"tensorrt: skipped: {e}")
            return None
    if name == "diffusers":
        return DiffusersProvider(paths, device, dtype, cfg)
    return EngineProvider(name, paths, device, dtype, cfg)
