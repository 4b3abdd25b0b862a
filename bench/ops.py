"""`python -m bench ops`: the fused kernels against what users run instead, per SD1.5 shape.

Decoupled cross-attention at every SD1.5 cross-attention shape (Lq 4096/1024/256/64 with head dims
40/80/160, 8 heads, 77 text tokens, 16 adapter tokens), providers side by side in one run:
- `fused`: kernels.decoupled_attention (Triton), where Triton can run on the device;
- `plugin`: kernels.packed_attention, the TensorRT plugin's kernel (packed tensors, AOT argument order);
- `two-sdpa`: two scaled_dot_product_attention calls plus the scaled add (diffusers' IP-Adapter processor);
- `xformers`: two memory_efficient_attention calls plus the add, where xformers is installed;
- `reference`: the plain PyTorch reference.
And the instruct projector with all four guidance branches of a request in one batch: `reference`
(the nn.Module) against `fused` (kernels.projector). Each provider's output is checked against the fp32
reference first; a wrong one gets no timing. Two timings in ms: `latency` (one pair of CUDA events around one
call, launch included: at small Lq that is Triton's launcher) and, on CUDA, `kernel_latency` (per call in a
CUDA graph of back-to-back calls: the kernels alone). TFLOP/s of the work done and GB/s of the bytes each call
must move at least once come from the kernel-only time where there is one.
"""
from __future__ import annotations

import torch

from ipadapter_instruct.kernels import decoupled_attention, decoupled_attention_ref, decoupled_attention_sdpa
from ipadapter_instruct.kernels._runtime import triton_unusable

from ipadapter_instruct.bench.common import Row, device_name, format_table, git_sha, hbm_peak, kernel_samples, measure, percentiles

ATTENTION_SHAPES = [(4096, 40), (1024, 80), (256, 160), (64, 160)]  # (Lq, D) of SD1.5's cross-attentions
HEADS, TEXT_TOKENS, ADAPTER_TOKENS = 8, 77, 16
BASELINE = "two-sdpa"
OPS_PROVIDERS = ("fused", "plugin", "two-sdpa", "xformers", "reference")
# a provider's error against the fp32 reference may be twice plain PyTorch's in the same dtype plus this x the
# reference's largest magnitude (flash-attention's rule, as tests/test_kernels_attention.py)
ATOL = {torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 5e-3}


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
    from ipadapter_instruct.kernels.packed_attention import packed_attention

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
    from ipadapter_instruct.kernels.packed_attention import DTYPES as PLUGIN_DTYPES

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


def wrong_output(got: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor) -> str | None:
    """None when `got` is as close to the fp32 reference `exact` as flash-attention's rule allows (at most twice
    the error of plain PyTorch in the same dtype, `plain`, plus ATOL x the reference's largest magnitude), else
    what is wrong with it."""
    if got.shape != exact.shape:
        return f"wrong output: shape {tuple(got.shape)}, expected {tuple(exact.shape)}"
    exact = exact.float()
    err = (got.float() - exact).abs().max().item()
    base = (plain.float() - exact).abs().max().item()
    bound = 2 * base + ATOL[got.dtype] * max(1.0, exact.abs().max().item())
    if not err <= bound:  # NaN fails too
        return f"wrong output: max error {err:.3g} against the fp32 reference, allowed {bound:.3g}"
    return None


def time_provider(fn, device, repeats, kernel_timer) -> tuple[dict[str, tuple], str | None]:
    """metric -> (p20, p50, p80) in ms: `latency` (one call, launch included) and, with a `kernel_timer`,
    `kernel_latency` (the kernels alone); and why the kernel-only time is missing, if it is."""
    times, why = {"latency": measure(fn, device, repeats)}, None
    if kernel_timer is not None:
        try:
            times["kernel_latency"] = percentiles(kernel_timer(fn))
        except Exception as e:  # a provider that cannot be captured in a CUDA graph keeps its launch-inclusive time
            why = f"kernel-only timing failed: {type(e).__name__}: {e}"
    return times, why


def rows_for(op, provider, x_name, x, times, flops, bytes_, env, config) -> list[Row]:
    """Latency rows for each timing in `times`; throughput and bandwidth from the kernel-only time where there
    is one (else from the launch-inclusive one), the slow percentile giving the low figure."""
    basis = "kernel_latency" if "kernel_latency" in times else "latency"
    out = [Row(op, provider, metric, "ms", x_name, x, *t, config=config, **env) for metric, t in times.items()]
    p20, p50, p80 = times[basis]
    derived = {**config, "timing": basis}
    out.append(Row(op, provider, "throughput", "TFLOP/s", x_name, x, flops / p80 / 1e9, flops / p50 / 1e9,
                   flops / p20 / 1e9, config=derived, **env))
    if bytes_:
        out.append(Row(op, provider, "bandwidth", "GB/s", x_name, x, bytes_ / p80 / 1e6, bytes_ / p50 / 1e6,
                       bytes_ / p20 / 1e6, config=derived, **env))
    return out


def run_checked(fns, args_call, exact, plain, device, repeats, kernel_timer, skipped, where):
    """Each provider's output checked against the reference, then timed: name -> times. A provider whose
    output is wrong gets no timing, only its line in `skipped`."""
    timed = {}
    for name, fn in fns.items():
        why = wrong_output(args_call(fn), plain, exact)
        if why:
            skipped[f"{name} {where}"] = why
            continue
        timed[name], why = time_provider(lambda fn=fn: args_call(fn), device, repeats, kernel_timer)
        if why:
            skipped[f"{name} {where} kernel_latency"] = why
    return timed


def _p50(times: dict) -> float:
    return times.get("kernel_latency", times["latency"])[1]


def bench_attention(device, dtype, batches, repeats, wanted, env, kernel_timer) -> tuple[list[Row], list, dict]:
    fns, skipped = attention_providers(device, wanted, dtype)
    peak = hbm_peak(env["device"])
    rows, lines = [], []
    for b in batches:
        for lq, d in ATTENTION_SHAPES:
            args = attention_inputs(b, lq, d, device, dtype)
            flops, bytes_ = attention_work(b, lq, d, args[0].element_size())
            config = dict(B=b, H=HEADS, Lq=lq, D=d, Lt=TEXT_TOKENS, Li=ADAPTER_TOKENS)
            shape = f"B{b} Lq{lq} D{d}"
            with torch.inference_mode():
                exact = decoupled_attention_ref(*[a.float() for a in args])
                plain = decoupled_attention_ref(*args)
                timed = run_checked(fns, lambda fn: fn(*args), exact, plain, device, repeats, kernel_timer,
                                    skipped, shape)
            for name, times in timed.items():
                rows += rows_for("decoupled_attention", name, "shape", shape, times, flops, bytes_, env, config)
                ms = _p50(times)
                gbs = bytes_ / ms / 1e6
                kernel = times.get("kernel_latency")
                lines.append([shape, name, f"{times['latency'][1]:.4f}", f"{kernel[1]:.4f}" if kernel else "-",
                              f"{flops / ms / 1e9:.3g}", f"{gbs:.4g}", f"{100 * gbs / peak:.0f}%" if peak else "-",
                              f"{_p50(timed[BASELINE]) / ms:.2f}x" if BASELINE in timed else "-"])
    return rows, lines, skipped


def bench_projector(device, dtype, repeats, wanted, env, kernel_timer) -> tuple[list[Row], list, dict]:
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    from ipadapter_instruct.engine.projector import InstructProjector, ProjectorConfig

    cfg = ProjectorConfig.preset("sd15")
    torch.manual_seed(0)
    module = InstructProjector(cfg).to(device, dtype).eval().requires_grad_(False)
    branches = 4  # full, img_only, every, uncond: one request in full guidance mode
    image = torch.randn(branches, 257, cfg.image_dim, device=device, dtype=dtype)
    text = torch.randn(branches, 77, cfg.text_dim, device=device, dtype=dtype)
    instruct = torch.randn(branches, 77, cfg.text_dim, device=device, dtype=dtype)
    fns, skipped = {"reference": lambda: module(image, instruct, text)}, {}
    reason = fused_unmeasurable(device)
    if reason:
        skipped["fused"] = reason
    else:
        from ipadapter_instruct.kernels.projector import projector_forward
        fns["fused"] = lambda: projector_forward(module, image, instruct, text)
    if wanted:
        fns = {n: f for n, f in fns.items() if n in wanted}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:  # not under inference_mode: it breaks the counter
        module(image, instruct, text)
    with torch.inference_mode():
        flops = float(counter.get_total_flops())
        weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        config = dict(branches=branches, image_tokens=257, text_tokens=77, preset="sd15")
        plain = module(image, instruct, text)
        exact = plain if dtype == torch.float32 else \
            copy.deepcopy(module).float()(image.float(), instruct.float(), text.float())
        timed = run_checked(fns, lambda fn: fn(), exact, plain, device, repeats, kernel_timer, skipped,
                            f"{branches} branches")
    rows, lines = [], []
    for name, times in timed.items():
        rows += rows_for("projector", name, "branches", branches, times, flops, weight_bytes, env, config)
        ms, kernel = _p50(times), times.get("kernel_latency")
        lines.append([f"{branches} branches", name, f"{times['latency'][1]:.4f}", f"{kernel[1]:.4f}" if kernel else "-",
                      f"{flops / ms / 1e9:.3g}", f"{weight_bytes / ms / 1e6:.4g}",
                      f"{_p50(timed['reference']) / ms:.2f}x" if "reference" in timed else "-"])
    return rows, lines, skipped


def run_ops(device: torch.device, dtype: torch.dtype, batches: list[int], repeats: int,
            wanted: list[str] | None, kernel_timer="auto") -> tuple[list[Row], str]:
    """Every provider at every shape -> long-format rows and the report. `kernel_timer(fn) -> [ms per call]`
    gives the kernel-only samples (default: `kernel_samples` on CUDA; none on the CPU, which has no CUDA graphs)."""
    env = dict(device=device_name(device), dtype=str(dtype).removeprefix("torch."), git_sha=git_sha())
    if kernel_timer == "auto":
        kernel_timer = kernel_samples if device.type == "cuda" else None
    rows, lines, skipped = bench_attention(device, dtype, batches, repeats, wanted, env, kernel_timer)
    p_rows, p_lines, p_skipped = bench_projector(device, dtype, repeats, wanted, env, kernel_timer)
    basis = "kernel-only" if kernel_timer else "launch-inclusive"
    headers = ["shape", "provider", "ms p50", "kernel ms p50", "TFLOP/s", "GB/s", "% HBM", f"vs {BASELINE}"]
    text = [f"device: {env['device']}   dtype: {env['dtype']}   git: {env['git_sha']}   repeats: {repeats}",
            f"ms p50: one call, launch included; kernel ms p50: per call in a CUDA graph of back-to-back calls; "
            f"throughput and speed-ups from the {basis} time", "",
            "decoupled cross-attention (H 8, Lt 77, Li 16)", format_table(headers, lines)]
    text += ["", "instruct projector (sd15 sizes, one request's guidance branches)",
             format_table(["batch", "provider", "ms p50", "kernel ms p50", "TFLOP/s", "GB/s weights",
                           "vs reference"], p_lines)]
    if kernel_timer is None:
        text.append(f"not measured: kernel_latency: CUDA graphs need CUDA (on the {device.type} only the per-call "
                    "latency)")
    for name, why in {**skipped, **{f"projector {k}": v for k, v in p_skipped.items()}}.items():
        text.append(f"not measured: {name}: {why}")
    return rows + p_rows, "\n".join(text)
