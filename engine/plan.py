"""A call's plan: which UNet rows it runs (a branch row per request and guidance branch, times each request's images),
which text each row reads, which latent each row predicts for, and how each latent's own rows combine."""
from __future__ import annotations

import torch

from ipadapter_instruct.engine.combine import Combination
from ipadapter_instruct.engine.guidance import branch_weights, resolve_mode


def expand_rows(branches: list[dict], texts: set, reqs: list) -> dict:
    """The plan from branch rows ({"r": request, "w": weight, "text": ...}): UNet rows (branches x each request's
    images), which latent each row predicts for, and how each latent's own rows combine (guidance.Combination)."""
    offsets = [0]
    for req in reqs:
        offsets.append(offsets[-1] + req.num_images)
    branch_of_row, latent_of_row, cols = [], [], []
    for j, row in enumerate(branches):
        for k in range(reqs[row["r"]].num_images):
            branch_of_row.append(j)
            latent_of_row.append(offsets[row["r"]] + k)
            cols.append(row["w"])
    return {"branches": branches, "texts": texts, "text": [b["text"] for b in branches],
            "branch_of_row": torch.tensor(branch_of_row), "latent_of_row": torch.tensor(latent_of_row),
            "row_request": [branches[j]["r"] for j in branch_of_row],
            "combine": Combination.of(latent_of_row, cols, offsets[-1])}


def plan_rows(reqs: list, instruct: bool) -> dict:
    """Branch rows (one per request x guidance branch), UNet rows (x images) and the combination weights."""
    branches, texts = [], set()
    for r, req in enumerate(reqs):
        mode = resolve_mode(req.guidance_mode, req.instruct, req.guidance_scale, instruct)
        for br, w in branch_weights(mode, req.guidance_scale, req.instruct_guidance_scale, req.image_guidance_scale):
            src = {"prompt": req.prompt, "negative": req.negative_prompt,
                   "instruction": req.instruct, "everything": "everything", "empty": ""}
            row = {"r": r, "w": w, "name": br.name, "image": br.image, "text": src[br.text],
                   "instruct": src[br.instruct], "ip_prompt": src[br.ip_prompt]}
            texts.add(row["text"])
            if instruct:
                texts.update((row["instruct"], row["ip_prompt"]))
            branches.append(row)
    return expand_rows(branches, texts, reqs)
