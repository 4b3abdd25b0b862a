"""`python -m bench ops`: the fused kernels against what users run instead, per SD1.5 shape.

Decoupled cross-attention at every SD1.5 cross-attention shape (Lq 4096/1024/256/64 with head dims
40/80/160, 8 heads, 77 text tokens, 16 adapter tokens), providers side by side in one run:
- `fused`: kernels.decoupled_attention (Triton), where Triton can run on the device;
- `plugin`: kernels.packed_attention, the TensorRT plugin's kernel (packed tensors, AOT argument order);
- `two-sdpa`: two scaled_dot_product_attention calls plus the scaled add (diffusers' IP-Adapter processor);
- `xformers`: two memory_efficient_attention calls plus the add, where xformers is installed;
- `reference`: the plain PyTorch reference.
And the instruct projector with all four guidance branches of a request in one batch: `reference`
(the nn.Module) against `fused` (kernels.projector). Times in ms, TFLOP/s of the work done, GB/s of
the bytes each call must move at least once.
"""
from __future__ import annotations

import torch

from kernels import decoupled_attention, decoupled_attention_ref, decoupled_attention_sdpa
from kernels._runtime import triton_unusable

from .common import Row, device_name, format_table, git_sha, hbm_peak, measure

ATTENTION_SHAPES = [(4096, 40), (1024, 80), (256, 160), (64, 160)]  # (Lq, D) of SD1.5's cross-attentions
HEADS, TEXT_TOKENS, ADAPTER_TOKENS = 8, 77, 16
BASELINE = "two-sdpa"
OPS_PROVIDERS = ("fused", "plugin", "two-sdpa", "xformers", "reference")


def _xformers_fn():
    try:
        import xformers.ops as xops
    except ImportError:
        return None

    def fn(q, k, v, k_ip, v_ip, scale):
        # xformers wants (B, L, H, D)
        t = lambda x: x.transpose(1, 2)  # noqa: E731
        out = xops.memory_efficient_attention(t(q), t(k), t(v))
        return out + scale.to(q.dtype).view(-1, 1, 1, 1) * xops.memory_efficient_attention(t(q), t(k_ip), t(v_ip))
    return fn


def _plugin_fn(q, k, v, k_ip, v_ip, scale):
    from kernels.packed_attention import packed_attention

    # the inputs are heads-split views of packed (B, L, H*D) tensors: packing back is a view, no copy
    pack = lambda x: x.transpose(1, 2).flatten(2)  # noqa: E731
    return packed_attention(pack(q), pack(k), pack(v), pack(k_ip), pack(v_ip), scale, q.shape[1])


def fused_unmeasurable(device: torch.device) -> str | None:
    """Why the fused kernels cannot be timed on `device`, or None."""
    reason = triton_unusable(device)
    if reason is None and device.type != "cuda":
        reason = "the Triton interpreter on the CPU is a correctness tool; its timings mean nothing"
    return reason


def attention_providers(device: torch.device, wanted: list[str] | None,
                        dtype: torch.dtype | None = None) -> tuple[dict, dict]:
    """name -> fn(q, k, v, k_ip, v_ip, scale), and name -> why it is not measured."""
    from kernels.packed_attention import DTYPES as PLUGIN_DTYPES

    fns, skipped = {}, {}
    reason = fused_unmeasurable(device)
    if reason:
        skipped["fused"] = skipped["plugin"] = reason
    else:
        fns["fused"] = decoupled_attention
        if dtype is None or dtype in PLUGIN_DTYPES:
            fns["plugin"] = _plugin_fn  # the TensorRT plugin's kernel (packed layout, AOT calling convention)
        else:
            skipped["plugin"] = f"the TensorRT plugin is built for fp32 and fp16, not {str(dtype).removeprefix('torch.')}"
    fns[BASELINE] = decoupled_attention_sdpa
    xf = _xformers_fn()
    if xf is None:
        skipped["xformers"] = "xformers is not installed"
    else:
        fns["xformers"] = xf
    fns["reference"] = decoupled_attention_ref
    if wanted:
        skipped.update({n: "not in --providers" for n in fns if n not in wanted})
        fns = {n: f for n, f in fns.items() if n in wanted}
    return fns, skipped


def attention_inputs(b: int, lq: int, d: int, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    # as the engine has them: heads split off (B, L, H*D) projections
    heads = lambda n: r(b, n, HEADS * d).unflatten(-1, (HEADS, d)).transpose(1, 2)  # noqa: E731
    q = heads(lq)
    k, v = heads(TEXT_TOKENS), heads(TEXT_TOKENS)
    k_ip, v_ip = heads(ADAPTER_TOKENS), heads(ADAPTER_TOKENS)
    scale = torch.full((b,), 0.8, device=device)
    return q, k, v, k_ip, v_ip, scale


def attention_work(b: int, lq: int, d: int, itemsize: int) -> tuple[float, float]:
    """FLOPs (two matmuls per branch) and the bytes read and written at least once."""
    keys = TEXT_TOKENS + ADAPTER_TOKENS
    flops = 4.0 * b * HEADS * lq * keys * d
    bytes_ = itemsize * b * HEADS * d * (2 * lq + 2 * keys)
    return flops, bytes_


def rows_for(op, provider, x_name, x, times, flops, bytes_, env, config) -> list[Row]:
    p20, p50, p80 = times
    out = [Row(op, provider, "latency", "ms", x_name, x, p20, p50, p80, config=config, **env)]
    # throughput figures from the same samples: the slow quantile gives the low figure
    out.append(Row(op, provider, "throughput", "TFLOP/s", x_name, x, flops / p80 / 1e9, flops / p50 / 1e9,
                   flops / p20 / 1e9, config=config, **env))
    if bytes_:
        out.append(Row(op, provider, "bandwidth", "GB/s", x_name, x, bytes_ / p80 / 1e6, bytes_ / p50 / 1e6,
                       bytes_ / p20 / 1e6, config=config, **env))
    return out


def bench_attention(device, dtype, batches, repeats, wanted, env) -> tuple[list[Row], list[list[str]], dict]:
    fns, skipped = attention_providers(device, wanted, dtype)
    peak = hbm_peak(env["device"])
    rows, lines = [], []
    for b in batches:
        for lq, d in ATTENTION_SHAPES:
            args = attention_inputs(b, lq, d, device, dtype)
            flops, bytes_ = attention_work(b, lq, d, args[0].element_size())
            config = dict(B=b, H=HEADS, Lq=lq, D=d, Lt=TEXT_TOKENS, Li=ADAPTER_TOKENS)
            shape = f"B{b} Lq{lq} D{d}"
            p50 = {}
            with torch.inference_mode():
                for name, fn in fns.items():
                    times = measure(lambda: fn(*args), device, repeats)
                    p50[name] = times[1]
                    rows += rows_for("decoupled_attention", name, "shape", shape, times, flops, bytes_, env, config)
            for name, ms in p50.items():
                gbs = bytes_ / ms / 1e6
                lines.append([shape, name, f"{ms:.4f}", f"{flops / ms / 1e9:.3g}", f"{gbs:.4g}",
                              f"{100 * gbs / peak:.0f}%" if peak else "-",
                              f"{p50[BASELINE] / ms:.2f}x" if BASELINE in p50 else "-"])
    return rows, lines, skipped


def bench_projector(device, dtype, repeats, wanted, env) -> tuple[list[Row], list[list[str]], dict]:
    from torch.utils.flop_counter import FlopCounterMode

    from engine.projector import InstructProjector, ProjectorConfig

    cfg = ProjectorConfig.preset("sd15")
    torch.manual_seed(0)
    module = InstructProjector(cfg).to(device, dtype).eval()
    branches = 4  # full, img_only, every, uncond: one request in full guidance mode
    image = torch.randn(branches, 257, cfg.image_dim, device=device, dtype=dtype)
    text = torch.randn(branches, 77, cfg.text_dim, device=device, dtype=dtype)
    instruct = torch.randn(branches, 77, cfg.text_dim, device=device, dtype=dtype)
    fns, skipped = {"reference": lambda: module(image, instruct, text)}, {}
    reason = fused_unmeasurable(device)
    if reason:
        skipped["fused"] = reason
    else:
        from kernels.projector import projector_forward
        fns["fused"] = lambda: projector_forward(module, image, instruct, text)
    if wanted:
        fns = {n: f for n, f in fns.items() if n in wanted}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:  # not under inference_mode: it breaks the counter
        module.requires_grad_(False)(image, instruct, text)
    with torch.inference_mode():
        flops = float(counter.get_total_flops())
        weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        config = dict(branches=branches, image_tokens=257, text_tokens=77, preset="sd15")
        rows, lines, p50 = [], [], {}
        for name, fn in fns.items():
            times = measure(fn, device, repeats)
            p50[name] = times[1]
            rows += rows_for("projector", name, "branches", branches, times, flops, weight_bytes, env, config)
    for name, ms in p50.items():
        lines.append([f"{branches} branches", name, f"{ms:.4f}", f"{flops / ms / 1e9:.3g}",
                      f"{weight_bytes / ms / 1e6:.4g}", f"{p50['reference'] / ms:.2f}x" if "reference" in p50 else "-"])
    return rows, lines, skipped


def run_ops(device: torch.device, dtype: torch.dtype, batches: list[int], repeats: int,
            wanted: list[str] | None) -> tuple[list[Row], str]:
    env = dict(device=device_name(device), dtype=str(dtype).removeprefix("torch."), git_sha=git_sha())
    rows, lines, skipped = bench_attention(device, dtype, batches, repeats, wanted, env)
    p_rows, p_lines, p_skipped = bench_projector(device, dtype, repeats, wanted, env)
    headers = ["shape", "provider", "ms p50", "TFLOP/s", "GB/s", "% HBM", f"vs {BASELINE}"]
    text = [f"device: {env['device']}   dtype: {env['dtype']}   git: {env['git_sha']}   repeats: {repeats}", "",
            "decoupled cross-attention (H 8, Lt 77, Li 16)", format_table(headers, lines)]
    text += ["", "instruct projector (sd15 sizes, one request's guidance branches)",
             format_table(["batch", "provider", "ms p50", "TFLOP/s", "GB/s weights", "vs reference"], p_lines)]
    for name, why in {**skipped, **{f"projector {k}": v for k, v in p_skipped.items()}}.items():
        text.append(f"not measured: {name}: {why}")
    return rows + p_rows, "\n".join(text)
