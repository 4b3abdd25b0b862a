"""Condition images from request bytes: the format is sniffed from the bytes (never trusted from a name or a
content type), the pixel count is checked from the header before anything is decoded, and the decode is
guarded against decompression bombs."""
from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image


class ImageRejected(Exception):
    """status: 413 (too large) or 422 (not an image we take)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


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


def decode(data: bytes, max_pixels: int, max_bytes: int) -> Image.Image:
    """PNG/JPEG/WebP bytes -> RGB image; ImageRejected otherwise."""
    if len(data) > max_bytes:
        raise ImageRejected(413, "payload_too_large", f"image is {len(data)} bytes, over the {max_bytes}-byte limit")
    fmt = sniff(data)
    if fmt is None:
        raise ImageRejected(422, "invalid_image", "image is not a PNG, JPEG or WebP file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=[fmt])
            w, h = im.size
            if w * h > max_pixels:
                raise ImageRejected(413, "image_too_large",
                                    f"image is {w}x{h} = {w * h} pixels, over the {max_pixels}-pixel limit")
            im.load()
            return im.convert("RGB")
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected(413, "image_too_large", f"image refused as a decompression bomb: {e}") from None
    except Exception as e:  # truncated or corrupt files raise OSError, SyntaxError, ValueError, ...
        raise ImageRejected(422, "invalid_image", f"cannot decode the {fmt} image: {e}") from None
