"""Conditioning caches in front of a pipeline's encoders: CLIP image encodings keyed by the SHA-256 of the decoded
pixels, text encodings keyed by the text. A condition image or prompt that comes back skips its encoder; the
all-zero image's encoding (every unconditional branch) is computed once, at attach. A hit returns the tensor
the miss stored, so cached and uncached requests run the same numbers.

The pipeline consults it through one seam (`Pipeline.set_encoder_cache`): nothing on the pipeline is replaced."""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch
from PIL import Image


def pixel_key(image: Image.Image) -> str:
    image = image.convert("RGB")
    h = hashlib.sha256(f"{image.width}x{image.height}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


class LRU:
    def __init__(self, size: int):
        self.size, self.items = size, OrderedDict()

    def get(self, key):
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        if self.size <= 0:
            return
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)


class ConditioningCache:
    """`hits`/`misses` count per kind ("image", "text"); `on_lookup(kind, hit)` (metrics) is called per key.
    A pipeline consults it itself (`Pipeline.set_encoder_cache`); `attach(pipe)` sets it on one."""

    def __init__(self, size: int = 256, on_lookup=None):
        self.images_lru, self.texts_lru = LRU(size), LRU(size)
        self.hits = {"image": 0, "text": 0}
        self.misses = {"image": 0, "text": 0}
        self.on_lookup = on_lookup
        self.zero: dict = {}  # pooled? -> the all-zero image's row, computed once
        self._lock = threading.Lock()

    def _count(self, kind: str, hit: bool) -> None:
        (self.hits if hit else self.misses)[kind] += 1
        if self.on_lookup is not None:
            self.on_lookup(kind, hit)

    def attach(self, pipe) -> None:
        """Have `pipe` consult this cache; the unconditional image's encoding is computed now, once."""
        if getattr(pipe, "image_processor", None) is not None:
            with torch.inference_mode():
                self._zero(pipe, pipe.adapter is not None and pipe.adapter.kind == "plain")
        pipe.set_encoder_cache(self)

    def _zero(self, pipe, pooled: bool) -> torch.Tensor:
        # (1, ...) the all-zero image's row: the pipeline's own constant (engine/encoding.py)
        if pooled not in self.zero:
            self.zero[pooled] = pipe.zero_image_row(pooled)
        return self.zero[pooled]

    def texts(self, texts: list[str], compute) -> list:
        """Per text its encoding entry: cached ones as stored, the others from compute(missing texts) -> entries."""
        with self._lock:
            found = {t: self.texts_lru.get(t) for t in texts}
            missing = sorted({t for t, v in found.items() if v is None})
            for t in texts:
                self._count("text", found[t] is not None)
            if missing:
                for t, entry in zip(missing, compute(missing)):
                    found[t] = tuple(None if x is None else x.clone() for x in entry)
                    self.texts_lru.put(t, found[t])
        return [found[t] for t in texts]

    def images(self, images: list[Image.Image], pooled: bool, pipe) -> torch.Tensor:
        """-> (N + 1, ...) as Pipeline.encode_images: the images' rows (cached by their pixels), then the zero row."""
        with self._lock:
            keys = [(pooled, pixel_key(im)) for im in images]
            found = {k: self.images_lru.get(k) for k in keys}
            for k in keys:
                self._count("image", found[k] is not None)
            missing = {k: im for k, im in zip(keys, images) if found[k] is None}
            if missing:
                rows = pipe.encode_images(list(missing.values()), with_zero=False, pooled=pooled)
                for k, row in zip(missing, rows):
                    found[k] = row.clone()
                    self.images_lru.put(k, found[k])
            zero = self._zero(pipe, pooled)
        return torch.cat([torch.stack([found[k] for k in keys]), zero])
