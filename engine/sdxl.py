"""`engine.sdxl.SDXLPipeline`: IP-Adapter+, IPAdapter-Instruct and the plain IP-Adapter on Stable Diffusion XL,
through the same batched call as SD1.5.

`Pipeline.from_pretrained(sdxl_folder, image_encoder=..., adapter="ip-adapter-plus_sdxl_vit-h.safetensors")`
returns one (a diffusers StableDiffusionXLPipeline folder: text_encoder_2/ and tokenizer_2/ beside the rest).
What differs from SD1.5, as diffusers' StableDiffusionXLPipeline computes it:
  - text tokens: both encoders' penultimate hidden states side by side (768 + 1280 = 2048 wide in SDXL);
  - added conditioning per UNet row: the second encoder's pooled projection of that row's text ("text_embeds")
    and six time ids, original_size + crops_coords_top_left + target_size ("time_ids"; the sizes default to
    the output size, the crop to (0, 0), the same for the unconditional rows, as diffusers does without
    negative_original_size);
  - the negative prompt is encoded like the prompt. diffusers' zeros for a negative prompt of None
    (force_zeros_for_empty_prompt) have no counterpart: the engine's negative prompt is always a string.
IPAdapter-Instruct SDXL follows the reference release (ip_adapter_instruct.py, IPAdapterInstructSDXL, and its
pipeline_stable_diffusion_sdxl_extra_cfg.py): the projector (the same three-stream resampler as SD1.5's, 1280 wide,
20 heads, 16 queries, 2048 out) reads the instruction and the prompt as the first text encoder's last hidden
states; its image-only and unconditional branches read "" for both (the SD1.5 release reads the negative
prompt); every branch but the unconditional one takes the prompt's pooled embedding, the release's quirk kept;
the guidance formulas are SD1.5's (simple and 4-branch, chosen by the same keywords).
Everything else is the SD1.5 path: per-row adapter K/V and scales, the fused decoupled attention, one UNet batch
for every request's guidance rows.

An SDXL export (`python -m export onnx` on an SDXL folder) runs the same maths around its six graphs
(engine.exported.ExportedSDXLPipeline: ONNX Runtime's export.onnx_runtime.OnnxPipeline, TensorRT's
engine.trt.runtime.TensorRTPipeline pick it from the manifest's kind).
Step-level batching (engine/stepping.py) carries each flight's added conditioning rows beside its text rows.
LoRA loads through diffusers' SDXL loader (engine/lora.py), into the UNet and both text encoders. ControlNet
(engine/controlnet.py) passes each row's added conditioning to an SDXL ControlNet too. CUDA graphs keep the
added conditioning among their static buffers (copied once per call).
img2img and inpainting (`init_image=`, `strength=`, `mask_image=`; engine/img2img.py) follow diffusers'
StableDiffusionXLImg2ImgPipeline and StableDiffusionXLInpaintPipeline: their default strengths (STRENGTH), their
VAE handling (force_upcast, latents_mean/latents_std) and, where model_index.json sets requires_aesthetics_score
(the refiner's layout), the aesthetic score in place of target_size in the time ids.
"""
from __future__ import annotations

import copy
import inspect

import torch
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.pipeline import Pipeline
from ipadapter_instruct.engine.prepared import CallState, size_conditioning


def time_ids_misfit(unet, pooled: int, aesthetic: bool) -> str | None:
    """Why the UNet's added conditioning does not take the time ids (5 with an aesthetic score, else 6) and the
    second text encoder's pooled projection, or None."""
    time_dim, want = unet.config.addition_time_embed_dim, unet.add_embedding.linear_1.in_features
    ids = 5 if aesthetic else 6
    if time_dim is not None and ids * time_dim + pooled == want:
        return None
    why = f"the SDXL UNet's added conditioning takes {want} values per row, but {ids} time ids x {time_dim} + the " \
          f"second text encoder's {pooled}-wide pooled projection make {ids * (time_dim or 0) + pooled}"
    if time_dim and want - pooled == 5 * time_dim:
        return why + ": the UNet reads 5 time ids (an aesthetic score for target_size): its model_index.json " \
                     "should set requires_aesthetics_score, as the refiner's does"
    if time_dim and want - pooled == 6 * time_dim:
        return why + ": the UNet reads 6 time ids (target_size): its model_index.json sets " \
                     "requires_aesthetics_score, which this UNet does not take"
    return why + ": the UNet and text_encoder_2 are not one model"


class SDXLPipeline(Pipeline):
    KIND = "sdxl"
    # LoRA (engine/lora.py) through diffusers' SDXL loader: the UNet and both text encoders (kohya's lora_te1_/
    # lora_te2_ keys included)
    _loader = StableDiffusionXLLoraLoaderMixin
    _lora_loadable_modules = StableDiffusionXLLoraLoaderMixin._lora_loadable_modules
    # diffusers' aesthetic_score and negative_aesthetic_score: a model whose model_index.json sets
    # requires_aesthetics_score (the refiner) reads them in place of target_size in its time ids
    AESTHETIC = (6.0, 2.5)
    requires_aesthetics_score = False  # (set per model in __init__; an exported pipeline keeps this)

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, text_encoder_2=None, tokenizer_2=None,
                 requires_aesthetics_score: bool = False, **kwargs):
        if text_encoder_2 is None or tokenizer_2 is None:
            raise EngineError("an SDXL pipeline needs text_encoder_2 and tokenizer_2 (an SDXL diffusers folder)")
        super().__init__(unet, vae, text_encoder, tokenizer, scheduler, **kwargs)
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        text_encoder_2.to(self.device, self.dtype).eval().requires_grad_(False)
        self.requires_aesthetics_score = bool(requires_aesthetics_score)
        misfit = time_ids_misfit(unet, text_encoder_2.config.projection_dim, self.requires_aesthetics_score)
        if misfit:
            raise EngineError(misfit)

    @property
    def STRENGTH(self) -> dict:
        """A photo's default strength per task, diffusers' defaults: StableDiffusionXLImg2ImgPipeline 0.3 (its
        ControlNet img2img pipeline 0.8), StableDiffusionXLInpaintPipeline (and its ControlNet one) 0.9999."""
        return {"img2img": 0.8 if self.controlnets else 0.3, "inpaint": 0.9999}

    # ---- what differs from SD1.5 ----------------------------------------------------------------------

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """-> (N, 77, width 1 + width 2): both encoders' penultimate hidden states side by side."""
        return torch.stack([hidden for hidden, _ in self._text_entries(texts)])

    def _text_entries(self, texts: list[str]) -> list[tuple]:
        # -> per text (both encoders' tokens, the second encoder's pooled projection: the added conditioning)
        hidden, pooled = [], None
        for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            out = enc(ids.to(self.device), output_hidden_states=True)
            if out[0].ndim == 2:  # the projection model's text_embeds (diffusers: the last encoder's)
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return list(zip(torch.cat(hidden, dim=-1).to(self.dtype), pooled.to(self.dtype)))

    @torch.inference_mode()
    def __call__(self, *args, original_size=None, target_size=None, crops_coords_top_left=(0, 0), **kwargs):
        """`Pipeline.__call__`, plus SDXL's size conditioning: `original_size` and `target_size` as (height, width)
        (default: the output size) and `crops_coords_top_left` as (top, left), as diffusers takes them."""
        call = CallState(size_conditioning=size_conditioning(original_size, target_size, crops_coords_top_left))
        bound = inspect.signature(Pipeline.__call__).bind(self, *args, **kwargs)
        bound.apply_defaults()
        return self._run({k: v for k, v in bound.arguments.items() if k != "self"}, call)

    def _plan(self, reqs) -> dict:
        """SD1.5's branches, with the release's SDXL projector inputs: its image-only and unconditional branches
        read the empty string as instruction and prompt (IPAdapterInstructSDXL.generate), where its SD1.5 class
        reads the negative prompt."""
        plan = super()._plan(reqs)
        if self.adapter is not None and self.adapter.kind == "instruct":
            for b in plan["branches"]:
                if b["name"] in ("img_only", "uncond"):
                    b["instruct"] = b["ip_prompt"] = ""
        # the two-encoder encoding is the UNet's only: the projector's instruction and prompt tokens are the first
        # encoder's own (_project), so the instruction strings are not run through both encoders for nothing
        plan["texts"] = {b["text"] for b in plan["branches"]}
        return plan

    def _project(self, feats: dict, image_rows: list, emb: dict, plan: dict, call: CallState):
        """IPAdapter-Instruct SDXL's projector reads the instruction and the prompt as the first text encoder's
        last hidden states (768 wide in SDXL), not the UNet's two-encoder tokens."""
        if self.adapter.kind != "instruct":
            return super()._project(feats, image_rows, emb, plan, call)
        texts = sorted({b[k] for b in plan["branches"] for k in ("instruct", "ip_prompt")})
        small = dict(zip(texts, self.projector_text(texts)))
        return super()._project(feats, image_rows, small, plan, call)

    def projector_text(self, texts: list[str]) -> torch.Tensor:
        """-> (N, 77, width 1): the first text encoder's last hidden states, as SD1.5's encode_text gives them (the
        Instruct projector's instruction and prompt tokens)."""
        return Pipeline.encode_text(self, texts)

    def _prepare(self, reqs, num_inference_steps, height, width, scheduler, max_size, control=None,
                 call: CallState | None = None):
        call = call if call is not None else CallState()
        p = super()._prepare(reqs, num_inference_steps, height, width, scheduler, max_size, control, call)
        # the pooled projection per branch: the prompt's, except in the unconditional branch (the release's
        # image-only and everything branches pair the negative tokens with the prompt's pooled embedding)
        texts = [reqs[b["r"]].negative_prompt if b["name"] == "uncond" else reqs[b["r"]].prompt
                 for b in p.plan["branches"]]
        missing = sorted({t for t in texts if t not in call.pooled})
        if missing:  # texts the UNet's rows do not read (a branch pairs the negative tokens with the prompt's pooled)
            self._encode_texts(missing, call)
        branch = p.plan["branch_of_row"].to(self.device)
        pooled = torch.stack([call.pooled[t] for t in texts]).index_select(0, branch)
        p.added = {"text_embeds": pooled, "time_ids": self._time_ids(p, call).index_select(0, branch)}
        return p

    def _time_ids(self, p, call: CallState) -> torch.Tensor:
        """-> (branches, 5 or 6): original_size + crops_coords_top_left + target_size, as diffusers; on a model that
        requires an aesthetic score (diffusers' img2img/inpaint pipelines with requires_aesthetics_score) the score
        in place of target_size, the negative one on the unconditional branch (diffusers' negative half)."""
        original, crop, target = call.size_conditioning
        size = (p.height, p.width)
        head = list(original or size) + list(crop)
        names = [b["name"] for b in p.plan["branches"]]
        if self.requires_aesthetics_score:
            score, negative = self.AESTHETIC
            rows = [head + [negative if name == "uncond" else score] for name in names]
        else:
            rows = [head + list(target or size)] * len(names)
        return torch.tensor(rows, device=self.device, dtype=self.dtype)

    # ---- the VAE as diffusers' SDXL pipelines run it (PyTorch runtime; exported graphs keep their own) ----------

    def photo_distribution(self, pixels: torch.Tensor):
        """diffusers' SDXL img2img/inpaint encode: in float32 when the VAE config says force_upcast (SDXL's VAE
        overflows in float16); the distribution stays float32 (its sample is cast by photo_latents)."""
        if self.RUNTIME != "torch" or not self.vae.config.force_upcast or self.vae.dtype == torch.float32:
            return super().photo_distribution(pixels)
        return self._vae_float32().encode(pixels.float()).latent_dist

    def photo_latents(self, sample: torch.Tensor) -> torch.Tensor:
        """A latent sample in the model's dtype, normalised by the VAE's latents_mean/latents_std where its config
        has them (StableDiffusionXLImg2ImgPipeline; its inpaint pipeline skips them when encoding), else times the
        scaling factor."""
        if self.RUNTIME != "torch":
            return super().photo_latents(sample)
        sample = sample.to(self.dtype)
        stats = self._latent_stats(sample)
        if stats is None:
            return super().photo_latents(sample)
        mean, std = stats
        return (sample - mean) * self.vae.config.scaling_factor / std

    def _decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """diffusers' SDXL decode: latents_mean/latents_std undone where the VAE config has them; a float16 VAE with
        force_upcast decodes in float32."""
        if self.RUNTIME != "torch":
            return super()._decode_pixels(latents)
        cfg, stats = self.vae.config, self._latent_stats(latents)
        upcast = self.vae.dtype == torch.float16 and cfg.force_upcast
        if stats is None and not upcast:
            return super()._decode_pixels(latents)
        z = latents / cfg.scaling_factor if stats is None else latents * stats[1] / cfg.scaling_factor + stats[0]
        vae = self._vae_float32() if upcast else self.vae
        return vae.decode(z.to(vae.dtype), return_dict=False)[0]

    def _latent_stats(self, like: torch.Tensor):
        # the VAE config's (latents_mean, latents_std) as (1, C, 1, 1) tensors like `like`, or None
        cfg = self.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is None or std is None:
            return None
        return tuple(torch.tensor(v).view(1, -1, 1, 1).to(like.device, like.dtype) for v in (mean, std))

    def _vae_float32(self):
        """A float32 copy of the VAE (made once per VAE and device), for force_upcast: the pipeline's own VAE is
        never cast in place, since concurrent calls share it."""
        held = self.__dict__.get("_vae32")
        device = next(self.vae.parameters()).device
        if held is None or held[0] is not self.vae or held[2] != device:
            held = (self.vae, copy.deepcopy(self.vae).float(), device)
            self._vae32 = held
        return held[1]
