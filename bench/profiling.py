"""`python -m bench --profile DIR`: one extra request per provider and batch size under torch.profiler.

Writes `<provider>-batch<b>.json.gz` (a gzipped Chrome trace: ui.perfetto.dev opens it as it is) and
`<provider>-batch<b>.txt` (the ops with the most self time) to DIR, and counts how often each named stage ran
in that request. The engine names its stages `engine::text_encoder`, `engine::image_encoder`,
`engine::projector`, `engine::kv` (every cross-attention layer's encoder-side K/V), `engine::unet_step` and
`engine::vae_decode`; the diffusers provider's module hooks open `diffusers::...` ranges with the same stage
names. The counts are what "step-invariant work once per request" means, read from the profile itself:
the engine runs its projector and K/V once per request, diffusers its projector inside every UNet call.
"""
from __future__ import annotations

import os

import torch
from torch.autograd import DeviceType

PREFIXES = ("engine::", "diffusers::")
STAGES = ("text_encoder", "image_encoder", "projector", "image_latent", "kv", "unet_step", "vae_decode")


def profile_request(call, device: torch.device, stem: str) -> dict[str, int]:
    """Run `call()` once under the profiler; write `stem`.json.gz and `stem`.txt -> {stage: times it ran}."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with profile(activities=activities) as prof:
        call()
        if cuda:
            torch.cuda.synchronize(device)
    prof.export_chrome_trace(stem + ".json.gz")  # gzipped by torch: an SD1.5 request's trace is tens of MB raw
    averages = prof.key_averages()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    with open(stem + ".txt", "w") as f:
        f.write(averages.table(sort_by=sort, row_limit=30) + "\n")
    counts: dict[str, int] = {}
    for e in averages:  # host-side ranges only (on CUDA each range also has a GPU-side annotation)
        if e.key.startswith(PREFIXES) and e.device_type == DeviceType.CPU:
            stage = e.key.split("::", 1)[1]
            counts[stage] = counts.get(stage, 0) + e.count
    return {s: counts[s] for s in (*STAGES, *sorted(set(counts) - set(STAGES))) if s in counts}


def format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{stage} x{n}" for stage, n in counts.items())
