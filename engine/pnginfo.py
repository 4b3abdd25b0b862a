"""Generation parameters in a PNG's text chunk, in Automatic1111's "parameters" format (which image viewers,
Automatic1111's "PNG Info" tab and ComfyUI's loaders read):

    a red house by a lake
    Negative prompt: blurry
    Steps: 30, Sampler: Euler a, CFG scale: 6.0, Seed: 1234, Size: 512x512, Model: sd15, Instruct: use the style

The first line(s) the prompt, then "Negative prompt: ..." (when there is one), then one line of "Key: value" pairs:
A1111's own keys first, then this engine's (Instruct, IP-Adapter scale, ...). A value holding a comma, colon or
newline is JSON-quoted, as A1111 writes it. `params` takes the Python API's names (prompt, negative_prompt,
num_inference_steps, scheduler, guidance_scale, seed, width, height, model, instruct, scale, ...); a key outside the
table is written with its own name. Light: PIL only.
"""
from __future__ import annotations

import io
import json

from PIL.PngImagePlugin import PngInfo

# API name -> A1111's label, in A1111's order, then the engine's own
LABELS = {
    "num_inference_steps": "Steps", "scheduler": "Sampler", "guidance_scale": "CFG scale", "seed": "Seed",
    "size": "Size", "model": "Model", "strength": "Denoising strength", "image_guidance_scale": "Image CFG scale",
    "instruct": "Instruct", "instruct_guidance_scale": "Instruct CFG scale", "guidance_mode": "Guidance mode",
    "scale": "IP-Adapter scale", "adapter": "IP-Adapter", "lora": "LoRA", "controlnet": "ControlNet",
}
# the engine's scheduler names -> A1111's sampler names (others are written as they are)
SAMPLERS = {"euler": "Euler", "euler_a": "Euler a", "ddim": "DDIM", "dpmpp_2m": "DPM++ 2M", "pndm": "PLMS",
            "lcm": "LCM", "tcd": "TCD", "heun": "Heun", "lms": "LMS", "unipc": "UniPC", "ddpm": "DDPM"}
TEXT = ("prompt", "negative_prompt", "width", "height")  # written apart from the "Key: value" line


def quote(value) -> str:
    text = str(value)
    if not any(c in text for c in ",:\n\""):
        return text
    return json.dumps(text, ensure_ascii=False)


def parameters_text(params: dict) -> str:
    """The "parameters" text of one image (see the module's docstring); None values are left out."""
    given = {k: v for k, v in params.items() if v is not None}
    pairs = dict(given)
    if "width" in given and "height" in given:
        pairs["size"] = f"{given['width']}x{given['height']}"
    if "scheduler" in pairs:
        pairs["scheduler"] = SAMPLERS.get(pairs["scheduler"], pairs["scheduler"])
    keys = [k for k in LABELS if k in pairs] + [k for k in pairs if k not in LABELS and k not in TEXT]
    line = ", ".join(f"{LABELS.get(k, k)}: {quote(pairs[k])}" for k in keys)
    lines = [str(given.get("prompt", ""))]
    if given.get("negative_prompt"):
        lines.append(f"Negative prompt: {given['negative_prompt']}")
    return "\n".join(lines + [line])


def pnginfo(params: dict) -> PngInfo:
    """A PngInfo holding the "parameters" tEXt chunk (pass it as `image.save(..., pnginfo=...)`)."""
    info = PngInfo()
    info.add_text("parameters", parameters_text(params))
    return info


def png_bytes(image, params: dict) -> bytes:
    """The image as PNG bytes with its generation parameters in the "parameters" chunk."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=pnginfo(params))
    return buf.getvalue()
