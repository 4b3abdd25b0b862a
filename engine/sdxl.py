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
"""
from __future__ import annotations

import inspect

import torch
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.pipeline import Pipeline
from ipadapter_instruct.engine.prepared import CallState, size_conditioning

class SDXLPipeline(Pipeline):
    KIND = "sdxl"
    # LoRA (engine/lora.py) through diffusers' SDXL loader: the UNet and both text encoders (kohya's lora_te1_/
    # lora_te2_ keys included)
    _loader = StableDiffusionXLLoraLoaderMixin
    _lora_loadable_modules = StableDiffusionXLLoraLoaderMixin._lora_loadable_modules

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, text_encoder_2=None, tokenizer_2=None,
                 **kwargs):
        if text_encoder_2 is None or tokenizer_2 is None:
            raise EngineError("an SDXL pipeline needs text_encoder_2 and tokenizer_2 (an SDXL diffusers folder)")
        super().__init__(unet, vae, text_encoder, tokenizer, scheduler, **kwargs)
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        text_encoder_2.to(self.device, self.dtype).eval().requires_grad_(False)
        time_dim = unet.config.addition_time_embed_dim
        pooled = text_encoder_2.config.projection_dim
        want = unet.add_embedding.linear_1.in_features
        if time_dim is None or 6 * time_dim + pooled != want:
            raise EngineError(f"the SDXL UNet's added conditioning takes {want} values per row, but 6 time ids x "
                              f"{time_dim} + the second text encoder's {pooled}-wide pooled projection make "
                              f"{6 * (time_dim or 0) + pooled}: the UNet and text_encoder_2 are not one model")

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
        original, crop, target = call.size_conditioning
        size = (p.height, p.width)
        ids = list(original or size) + list(crop) + list(target or size)
        time_ids = torch.tensor([ids], device=self.device, dtype=self.dtype).expand(pooled.shape[0], 6)
        p.added = {"text_embeds": pooled, "time_ids": time_ids}
        return p
