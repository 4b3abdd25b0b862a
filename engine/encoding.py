"""A pipeline's encoders (EncodingMixin: texts, condition images), and the encodings that are constants of its
weights (ModelConstants), computed once per pipeline instead of once per call.

Every unconditional branch reads the all-zero image's CLIP encoding, and IPAdapter-Instruct's branches read the
fixed instructions "" and "everything": none depends on a request, so re-encoding them each call (as diffusers
re-encodes the zero image each call) is work for nothing. Each value is keyed by what it is, the encoder module that
made it, and the device and dtype it was made on; the text entries are dropped when the weights change (a LoRA
loaded, unloaded or rescaled: engine/lora.py). A value is computed under the pipeline's lock, so two calls that
arrive together compute it once, and is stored as its own tensor that no call writes into.
"""
from __future__ import annotations

import threading

import torch

from ipadapter_instruct.engine.loading import _crop

# the instructions the guidance branches read whatever the request says (engine/plan.py): "every" reads
# "everything", "uncond" the empty string
FIXED_TEXTS = frozenset({"", "everything"})


class ModelConstants:
    """Values keyed by tuples whose first item is their kind ("zero_image", "text"), computed once under a lock."""

    def __init__(self):
        self._values: dict = {}
        self._lock = threading.Lock()

    def get(self, key: tuple, compute):
        """The value under `key`, from `compute()` the first time."""
        with self._lock:
            if key not in self._values:
                self._values[key] = _own(compute())
            return self._values[key]

    def forget(self, kind: str) -> None:
        """Drop every value of `kind` (the first item of its key)."""
        with self._lock:
            for key in [k for k in self._values if k[0] == kind]:
                del self._values[key]


def _own(value):
    # a tensor of its own (not a view into a batch some call holds), through tuples
    if isinstance(value, torch.Tensor):
        return value.clone()
    return tuple(_own(v) for v in value) if isinstance(value, tuple) else value


def constants(pipe) -> ModelConstants:
    """The pipeline's ModelConstants (made on first use: exported pipelines skip Pipeline.__init__)."""
    return pipe.__dict__.setdefault("_constants", ModelConstants())


def encode_fixed_texts(pipe, texts: list[str]) -> list[tuple]:
    """`pipe._text_entries(texts)` with the fixed instructions read from the pipeline's constants (each encoded
    alone, once); the other texts are encoded together, as before."""
    fixed = [t for t in texts if t in FIXED_TEXTS]
    if not fixed:
        return pipe._text_entries(texts)
    store = constants(pipe)
    key = (id(getattr(pipe, "text_encoder", None)), str(pipe.device), str(pipe.dtype))
    found = {t: store.get(("text", t, *key), lambda t=t: tuple(pipe._text_entries([t])[0])) for t in fixed}
    others = [t for t in texts if t not in FIXED_TEXTS]
    found.update(zip(others, pipe._text_entries(others) if others else []))
    return [found[t] for t in texts]


class EncodingMixin:
    """Pipeline's step-invariant encoders: texts (through the server's conditioning cache when one is set, else
    with the fixed instructions from the constants) and condition images (the zero image's row a constant)."""

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        # -> (N, 77, text_dim) per-token last_hidden_state, padded to max length
        ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0].to(self.dtype)

    def _text_entries(self, texts: list[str]) -> list[tuple]:
        # -> per text (hidden (77, text_dim), pooled projection or None): what the conditioning cache holds
        return [(h, None) for h in self.encode_text(texts)]

    def _encode_texts(self, texts: list[str], call) -> dict:
        """text -> its UNet tokens, through the encoder cache when one is set (else the fixed instructions from the
        pipeline's constants, engine/encoding.py); pooled projections (SDXL) go to the call."""
        cache = self.encoder_cache
        entries = cache.texts(texts, self._text_entries) if cache is not None else encode_fixed_texts(self, texts)
        for t, (_, pooled) in zip(texts, entries):
            if pooled is not None:
                call.pooled[t] = pooled
        return {t: hidden for t, (hidden, _) in zip(texts, entries)}

    def _image_features(self, images: list, pooled: bool) -> torch.Tensor:
        # -> (N + 1, ...) as encode_images, through the encoder cache when one is set
        if self.encoder_cache is not None:
            return self.encoder_cache.images(images, pooled, self)
        return self.encode_images(images, pooled=pooled)

    def encode_images(self, images: list, with_zero: bool = True,
                      pooled: bool | None = None) -> torch.Tensor:
        # -> (N + 1, Ni, image_dim) penultimate hidden states; the last row is the all-zero image (with_zero).
        # pooled (default: whether the first adapter is a plain one): (N + 1, projection_dim) pooled embeddings
        if pooled is None:
            pooled = self.adapter is not None and self.adapter.kind == "plain"
        rows = self._image_rows(self.image_processor(images=images, return_tensors="pt").pixel_values, pooled)
        return torch.cat([rows, self.zero_image_row(pooled)]) if with_zero else rows

    def zero_image_row(self, pooled: bool) -> torch.Tensor:
        """(1, ...) the all-zero image's encoding (every unconditional branch reads it): a constant of the image
        encoder's weights, encoded once per pipeline (engine/encoding.py)."""
        key = ("zero_image", pooled, id(getattr(self, "image_encoder", None)), str(self.device), str(self.dtype))
        return constants(self).get(key, lambda: self._zero_image_row(pooled))

    def _zero_image_row(self, pooled: bool) -> torch.Tensor:
        if pooled:  # diffusers' convention for plain IP-Adapter: zeros are the unconditional pooled embedding
            return torch.zeros(1, self.image_encoder.config.projection_dim, device=self.device, dtype=self.dtype)
        return self._image_rows(torch.zeros(1, 3, *_crop(self.image_processor)), False)

    def _image_rows(self, pixels: torch.Tensor, pooled: bool) -> torch.Tensor:
        # preprocessed pixels -> the image encoder's pooled embeddings or penultimate hidden states
        pixels = pixels.to(self.device, self.dtype)
        if pooled:
            return self.image_encoder(pixels).image_embeds
        return self.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
