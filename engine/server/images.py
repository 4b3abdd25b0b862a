"""Request images from bytes: the format is sniffed from the bytes (never trusted from a name or a content type),
the pixel count is checked from the header before anything is decoded, the decode is guarded against
decompression bombs, and an image is decoded no larger than it is used (`Use`): a JPEG decodes reduced (libjpeg's
draft scaling), a PNG or WebP, which cannot, is reduced right after its decode and the full-size pixels dropped.

Two steps, so the server can bound the pixels decoded at once (uploads.PixelBudget): `open_image` reads the header
(cheap) and says what decoding will cost in `Pending.pixels`; `load` decodes and reduces."""
from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

from PIL import Image


class ImageRejected(Exception):
    """status: 413 (too large) or 422 (not an image we take)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True)
class Use:
    """The size an image is used at, so it is decoded no larger, reduced as its consumer would reduce it (so the
    consumer's own resize then keeps it as it is):
    - `short`: the shorter side resized to this, the aspect kept (CLIP's image processor, `shortest_edge`);
    - `width` x `height`: resized to exactly that (diffusers' VaeImageProcessor: a control image, a mask or an
      edit's photo at the output size), when that has fewer pixels;
    - `grid`: its own size floored to the grid (an edit's photo without height/width), refused over `max_side`.
    `resample`: the consumer's PIL filter. (Every consumer resizes before any conversion of its own.)"""
    short: int = 0
    width: int = 0
    height: int = 0
    grid: int = 0
    max_side: int = 0
    resample: int = Image.Resampling.LANCZOS

    def target(self, w: int, h: int) -> tuple[int, int] | None:
        """(width, height) to reduce a w x h image to; None when it is used at its size or larger."""
        if self.short:
            short, long = min(w, h), max(w, h)
            if short <= self.short:
                return None
            long = int(self.short * long / short)  # transformers' get_resize_output_image_size
            return (self.short, long) if w <= h else (long, self.short)
        if self.grid:
            tw, th = w // self.grid * self.grid, h // self.grid * self.grid
            if self.max_side and max(tw, th) > self.max_side:
                raise ImageRejected(422, "invalid_request", f"the image is {w}x{h}, over the largest output "
                                    f"{self.max_side} px (serve --max-size): send height and width, or a smaller image")
            return (tw, th) if 0 < tw * th < w * h else None
        if self.width and self.height and w * h > self.width * self.height:
            return self.width, self.height
        return None


@dataclass
class Pending:
    """An image whose header is read (and a JPEG's draft scale set), not yet decoded."""
    im: Image.Image
    fmt: str
    use: Use | None
    target: tuple[int, int] | None
    pixels: int   # what its decode holds at once: width x height as it decodes (after a JPEG's draft scaling)
    sent: tuple[int, int] = (0, 0)  # (width, height) as sent, before any reduction


def sniff(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def from_base64(text: str) -> bytes:
    """base64, or a data URL `data:image/...;base64,...`."""
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if ";base64" not in head:
            raise ImageRejected(422, "invalid_image", "a data URL image must be base64 (data:image/png;base64,...)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageRejected(422, "invalid_image", "image is not valid base64") from None


def decode(data: bytes, max_pixels: int, max_bytes: int, use: Use | None = None) -> Image.Image:
    """PNG/JPEG/WebP bytes -> an RGB image no larger than `use` needs; ImageRejected otherwise."""
    return load(open_image(data, max_pixels, max_bytes, use))


def open_image(data: bytes, max_pixels: int, max_bytes: int, use: Use | None = None) -> Pending:
    """The header read and checked, nothing decoded yet; ImageRejected."""
    if len(data) > max_bytes:
        raise ImageRejected(413, "payload_too_large", f"image is {len(data)} bytes, over the {max_bytes}-byte limit "
                            "(serve --max-upload-mb)")
    fmt = sniff(data)
    if fmt is None:
        raise ImageRejected(422, "invalid_image", "image is not a PNG, JPEG or WebP file")
    with _decoding(fmt):
        im = Image.open(io.BytesIO(data), formats=[fmt])
        w, h = im.size
        if w * h > max_pixels:
            raise ImageRejected(413, "image_too_large",
                                f"image is {w}x{h} = {w * h} pixels, over the {max_pixels}-pixel limit "
                                "(serve --max-pixels)")
        target = use.target(w, h) if use is not None else None
        if target is not None and fmt == "JPEG":
            im.draft(None, target)  # libjpeg decodes at 1/2, 1/4 or 1/8 scale, still at least the target size
        return Pending(im, fmt, use, target, im.size[0] * im.size[1], (w, h))


def load(pending: Pending) -> Image.Image:
    """Decode, convert, reduce: the full-size pixels live only inside this call. The size it was sent at stays in
    `info["sent_size"]` (a mask must have its photo's)."""
    im, use, pending.im = pending.im, pending.use, None
    with _decoding(pending.fmt):
        im.load()
        if im.mode != "RGB":
            im = im.convert("RGB")  # (converting an RGB image would copy it)
        if pending.target is not None and im.size != pending.target:
            im = im.resize(pending.target, use.resample)
        im.info["sent_size"] = pending.sent
        return im


class _decoding:
    """PIL's errors as ImageRejected: bombs 413, anything unreadable 422 (ImageRejected itself passes through)."""

    def __init__(self, fmt: str):
        self.fmt = fmt
        self.warnings = warnings.catch_warnings()

    def __enter__(self):
        self.warnings.__enter__()
        warnings.simplefilter("error", Image.DecompressionBombWarning)

    def __exit__(self, kind, e, tb):
        self.warnings.__exit__(kind, e, tb)
        if kind is None or issubclass(kind, ImageRejected):
            return False
        if issubclass(kind, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
            raise ImageRejected(413, "image_too_large", f"image refused as a decompression bomb: {e}") from None
        if issubclass(kind, Exception):  # truncated or corrupt files raise OSError, SyntaxError, ValueError, ...
            raise ImageRejected(422, "invalid_image", f"cannot decode the {self.fmt} image: {e}") from None
        return False
