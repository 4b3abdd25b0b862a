"""Guidance as one pattern: a batch of branches, one UNet call, a fixed linear combination.

IPAdapter-Instruct's reference release has two modes, chosen from the instruction text:
  simple: [full, uncond]                   eps = u + g (full - u)
  full:   [full, img_only, every, uncond]  eps = u + gi (full - every) + gt (every - img_only) + gimg (img_only - u)
Guidance is on when guidance_scale > 1; otherwise only the `full` branch runs. Each branch names its text
tokens and the inputs of the projector P(image, instruction, prompt):
  full     = text: prompt,   ip: P(image, instruction, prompt)
  img_only = text: negative, ip: P(image, negative, negative)
  every    = text: negative, ip: P(image, "everything", prompt)
  uncond   = text: negative, ip: P(zero image, "", negative)
(IP-Adapter+ has no instruction: its P reads the image alone.) InstructPix2Pix's three branches fit the
same `Branch` + weights shape.

`Combination` applies the weights: each image's prediction is a weighted sum gathered from its own rows only, never
a matrix over every row of the batch (where 0 x another request's NaN or infinity is NaN), so nothing a request
sends can reach another request's image, whatever its numbers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ipadapter_instruct.engine.errors import EngineError

MODES = ("auto", "simple", "full")
# The reference release switches to 2-branch guidance when the instruction contains one of these. It tests
# case-sensitive substrings; here a keyword counts in any case and only where a word starts with it ("Use the
# Style", "styles", "colored" count; "surface", "hairstyle" do not). An explicit mode reproduces any release run.
SIMPLE_KEYWORDS = ("style", "colour", "color", "everything", "face", "facial")
_SIMPLE_RULE = re.compile(r"\b(?:" + "|".join(SIMPLE_KEYWORDS) + ")", re.IGNORECASE)


@dataclass(frozen=True)
class Branch:
    name: str
    text: str          # "prompt" | "negative": which text tokens the UNet sees
    image: bool        # condition image (True) or the all-zero image (False)
    instruct: str      # "instruction" | "negative" | "everything" | "empty"
    ip_prompt: str     # "prompt" | "negative": prompt tokens fed to the projector


BRANCHES = {
    "full": Branch("full", "prompt", True, "instruction", "prompt"),
    "img_only": Branch("img_only", "negative", True, "negative", "negative"),
    "every": Branch("every", "negative", True, "everything", "prompt"),
    "uncond": Branch("uncond", "negative", False, "empty", "negative"),
}


def resolve_mode(mode: str, instruction: str | None, guidance_scale: float, instruct_adapter: bool) -> str:
    """-> "none" (one branch), "simple" (2) or "full" (4)."""
    if mode not in MODES:
        raise EngineError(f"unknown guidance mode {mode!r}; choose one of {', '.join(MODES)}")
    if guidance_scale <= 1:
        return "none"
    if not instruct_adapter:
        if mode == "full":
            raise EngineError("guidance mode 'full' needs an IPAdapter-Instruct adapter (this one is IP-Adapter+)")
        return "simple"
    if mode == "auto":
        return "simple" if _SIMPLE_RULE.search(instruction or "") else "full"
    return mode


def branch_weights(mode: str, guidance_scale: float, instruct_guidance_scale: float,
                   image_guidance_scale: float) -> list[tuple[Branch, float]]:
    """The branches of `mode` with their weights: eps = sum(w * eps_branch)."""
    g, gi, gimg = guidance_scale, instruct_guidance_scale, image_guidance_scale
    if mode == "none":
        plan = [("full", 1.0)]
    elif mode == "simple":
        plan = [("full", g), ("uncond", 1.0 - g)]
    elif mode == "full":
        plan = [("full", gi), ("img_only", gimg - g), ("every", g - gi), ("uncond", 1.0 - gimg)]
    else:
        raise EngineError(f"unknown resolved guidance mode {mode!r}")
    return [(BRANCHES[name], w) for name, w in plan]
