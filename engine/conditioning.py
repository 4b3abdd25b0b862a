"""A call's conditioning, the step-invariant inputs of its UNet rows: image features, the adapters' projected tokens,
the encoder K/V of every cross-attention layer with per-row scales (and masks), each step's adapter context, the
initial latents and the scheduler's step arguments. Functions of a pipeline's models and a call's requests and plan;
nothing is kept between calls.
"""
from __future__ import annotations

import inspect

import torch
from diffusers.utils.torch_utils import randn_tensor

from ipadapter_instruct.engine.attention import AdapterContext, expand_scale, precompute_kv, query_lengths
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.prepared import select_rows
from ipadapter_instruct.engine.selfcheck import describe, module_fp32, shape_key


def features(pipe, reqs: list):
    """Image features once per distinct image. -> ({"hidden"|"pooled": (unique + 1, ...)}, per request per
    adapter the feature rows of its images); the last row of each is the unconditional (zero) image."""
    unique = {id(im): im for r in reqs for slot in r.slots for im in slot.images}  # shared images once
    row = {key: i for i, key in enumerate(unique)}
    kinds = {"pooled" if a.kind == "plain" else "hidden" for a in pipe.adapters}
    # (plain and IP-Adapter+ together: both outputs of the image encoder)
    feats = {kind: pipe._image_features(list(unique.values()), kind == "pooled") for kind in kinds}
    return feats, [[[row[id(im)] for im in slot.images] for slot in r.slots] for r in reqs]


def project(pipe, feats: dict, image_rows: list, emb: dict, plan: dict):
    """Adapter tokens per branch row: (branch rows, n x Q, cross_dim) for an adapter that reads n images per
    request (their tokens concatenated; an unconditional branch gets n zero-image projections, as diffusers'
    negative embeds). One adapter: that tensor; several: a list, one per adapter."""
    from ipadapter_instruct.kernels.projector import projector_forward  # (deferred: Triton loads on the fused path's first use)

    branches = plan["branches"]
    out = []
    for a, adapter in enumerate(pipe.adapters):
        hidden = feats["pooled" if adapter.kind == "plain" else "hidden"]
        zero = hidden.shape[0] - 1
        n = len(image_rows[0][a])
        image = hidden[[i for b in branches for i in (image_rows[b["r"]][a] if b["image"] else [zero] * n)]]
        instruct = prompt = None
        if adapter.kind == "instruct":
            instruct = torch.stack([emb[b["instruct"]] for b in branches for _ in range(n)])
            prompt = torch.stack([emb[b["ip_prompt"]] for b in branches for _ in range(n)])
        if pipe._fused_projector and adapter.kind != "plain":
            args, proj = (image, instruct, prompt), adapter.projector
            tokens = pipe.selfcheck.run(
                "projector", shape_key(*args, a), lambda: projector_forward(proj, *args), lambda: proj(*args),
                None if pipe.dtype == torch.float32 else lambda: module_fp32(proj, *args), pipe.dtype,
                pipe.device, shape=f"image {describe(image)}, text {describe(prompt)}, adapter {a}")
        else:
            tokens = adapter.projector(image, instruct, prompt)
        out.append(tokens if n == 1 else tokens.reshape(len(branches), n * tokens.shape[1], tokens.shape[2]))
    return out if len(out) > 1 else out[0]


def unet_inputs(pipe, text_rows, ip_rows, reqs: list, plan: dict):
    """Per-row UNet inputs that hold for every step: text rows and, in the adapter context, the encoder K/V of
    every cross-attention layer and the per-row scales. -> (text rows, context)."""
    kv = precompute_kv(pipe.unet, pipe.cross, text_rows, ip_rows)
    index = plan["branch_of_row"].to(pipe.device)
    ctx = AdapterContext(kv={n: select_rows(kvs, index) for n, kvs in kv.items()}, scale=scales(pipe, reqs, plan))
    return text_rows.index_select(0, index), ctx


def scales(pipe, reqs: list, plan: dict, active: tuple | None = None) -> dict:
    """Per-row scale per cross-attention layer: (rows, 1, 1, 1), or with several adapters a tuple of them.
    active[r][a]: whether adapter a acts for request r at this step (None: every adapter everywhere)."""
    names = list(pipe.cross)
    per_req = [[expand_scale(pipe.unet, names, slot.scale) for slot in req.slots] for req in reqs]
    rows = plan["row_request"]

    def column(n, a):  # fp32 whatever the pipeline's dtype: what the kernels take, no per-layer cast per step
        values = [per_req[r][a][n] * (active is None or active[r][a]) for r in rows]
        return torch.tensor(values, device=pipe.device, dtype=torch.float32).view(-1, 1, 1, 1)
    if len(pipe.adapters) == 1:
        return {n: column(n, 0) for n in names}
    return {n: tuple(column(n, a) for a in range(len(pipe.adapters))) for n in names}


def step_contexts(pipe, ctx, reqs: list, plan: dict, total: int) -> list:
    """The adapter context of every step: `ctx` itself unless an adapter has a step range; then, per pattern of
    active adapters, one context sharing ctx's K/V and masks with its own scales (the zeros switch it off)."""
    if pipe.adapter is None or all(s.start <= 0.0 and s.end >= 1.0 for r in reqs for s in r.slots):
        return [ctx] * total
    made, out = {}, []
    for step in range(total):
        active = tuple(tuple(s.active(step, total) for s in r.slots) for r in reqs)
        if active not in made:
            made[active] = AdapterContext(kv=ctx.kv, scale=scales(pipe, reqs, plan, active), mask=ctx.mask)
        out.append(made[active])
    return out


def masks(pipe, reqs: list, plan: dict, height: int, width: int) -> dict:
    """Regional masks per cross-attention layer: a tuple (one per adapter) of (rows, Lq) floats, downsampled to
    each layer's queries by diffusers' IPAdapterMaskProcessor (ones for an adapter without a mask)."""
    from diffusers.image_processor import IPAdapterMaskProcessor  # (deferred: only calls with masks)

    f = pipe.vae_scale_factor
    processor = IPAdapterMaskProcessor(vae_scale_factor=f)
    full = {}  # (request, adapter) -> (1, 1, H, W) binarised mask
    for r, req in enumerate(reqs):
        for a, slot in enumerate(req.slots):
            if slot.mask is not None:
                try:
                    full[r, a] = processor.preprocess(slot.mask, height=height, width=width)
                except (ValueError, TypeError) as e:
                    raise EngineError(f"adapter mask of request {r}, adapter {a} cannot be read: {e}") from e
    rows = plan["row_request"]
    out, cache = {}, {}
    for name, (h, w) in query_lengths(pipe.unet, height // f, width // f).items():
        lq = h * w
        per_adapter = []
        for a in range(len(pipe.adapters)):
            cols = []
            for r in range(len(reqs)):
                if (r, a, lq) not in cache:
                    m = full.get((r, a))
                    cache[r, a, lq] = (torch.ones(1, lq) if m is None else
                                       IPAdapterMaskProcessor.downsample(m[:, 0], 1, lq, 1)[..., 0].float())
                cols.append(cache[r, a, lq])
            per_adapter.append(torch.cat([cols[r] for r in rows]).to(pipe.device))
        out[name] = tuple(per_adapter)
    return out


def initial_latents(pipe, reqs: list, sched, height: int, width: int) -> torch.Tensor:
    """(images, C, h, w): each request's noise from its own generator(s), in diffusers' order."""
    f = pipe.vae_scale_factor
    shape = (pipe.vae.config.latent_channels, height // f, width // f)  # (the UNet may take more: IP2P's 8)
    parts = [randn_tensor((req.num_images, *shape), generator=req.generator, device=pipe.device, dtype=pipe.dtype)
             for req in reqs]
    return torch.cat(parts) * sched.init_noise_sigma


def step_kwargs(sched, reqs: list) -> dict:
    # ancestral/stochastic schedulers draw noise each step: one generator per image row (a request's own per image,
    # or its one generator shared by its images)
    params = inspect.signature(sched.step).parameters
    # eta 0, as diffusers' pipelines pass it to every scheduler that takes one (DDIM's default; TCD's is 0.3)
    extra = {"eta": 0.0} if "eta" in params else {}
    if "generator" not in params:
        return extra
    if len(reqs) == 1:
        return {**extra, "generator": reqs[0].generator}
    if any(r.generator is None for r in reqs):
        return extra
    return {**extra, "generator": [g for r in reqs for g in (r.generator if isinstance(r.generator, list)
                                                             else [r.generator] * r.num_images)]}
