"""The report of `python -m bench e2e`: long-format rows (bench/common.py's Row, op "e2e") and the text table,
per provider and batch size, with the ratios to diffusers and to engine-eager."""
from __future__ import annotations

import statistics

from ipadapter_instruct.bench.common import Row, format_table, percentiles
from ipadapter_instruct.bench.e2e_config import E2EConfig


def quantiles(times: list[float]) -> dict[str, float]:
    keys = ("p20", "p50", "p80", "p90", "p99")
    return dict(zip(keys, percentiles(times, (20, 50, 80, 90, 99))))


def report(cfg: E2EConfig, env: dict, results: dict, flops: dict, rows: list[Row]) -> tuple[list[Row], str]:
    config = dict(task=cfg.task, preset=cfg.preset, steps=cfg.steps, height=cfg.height, width=cfg.width,
                  guidance_mode=cfg.guidance_mode, guidance_scale=cfg.guidance_scale, repeats=cfg.repeats,
                  compile=cfg.compile, cuda_graphs=cfg.cuda_graphs, adapters=cfg.adapters,
                  adapter_masks=cfg.adapter_masks, interleave=cfg.interleave)
    if cfg.task == "edit":
        config["image_guidance_scale"] = cfg.image_guidance_scale
    if cfg.task in ("img2img", "inpaint"):
        config["strength"] = cfg.strength
    lines = []
    for (name, b), r in results.items():
        q = quantiles(r["times"])
        c = {**config, "batch": b, "p90": q["p90"], "p99": q["p99"], "steps": r.get("steps", cfg.steps),
             "scheduler": r.get("scheduler") or cfg.scheduler or "default"}
        rows.append(Row("e2e", name, "latency", "ms", "batch", b, q["p20"], q["p50"], q["p80"], config=c, **env))
        ips = [b / (q[k] / 1e3) for k in ("p80", "p50", "p20")]
        rows.append(Row("e2e", name, "throughput", "images/s", "batch", b, *ips, config=c, **env))
        tflops = "-"
        if b in flops and r.get("steps", cfg.steps) == cfg.steps:  # (the count is of cfg.steps' work: not engine-lcm's few steps)
            t = [flops[b] / (q[k] / 1e3) / 1e12 for k in ("p80", "p50", "p20")]
            rows.append(Row("e2e", name, "throughput", "TFLOP/s", "batch", b, *t, config=c, **env))
            tflops = f"{t[1]:.3g}"
        if r["peak_gib"] is not None:
            rows.append(Row("e2e", name, "peak_memory", "GiB", "batch", b, *[r["peak_gib"]] * 3, config=c, **env))
        for stage, ms in r["stages"].items():
            rows.append(Row("e2e", name, f"stage:{stage.removesuffix('_ms')}", "ms", "batch", b, ms, ms, ms,
                            config=c, **env))
        for stage, n in r.get("calls", {}).items():  # --profile: how often each stage ran in one call
            rows.append(Row("e2e", name, f"calls:{stage}", "calls", "batch", b, n, n, n, config=c, **env))
        base, eager = results.get(("diffusers", b)), results.get(("engine-eager", b))
        ratio = f"{statistics.median(base['times']) / q['p50']:.2f}x" if base else "-"
        vs_eager = f"{statistics.median(eager['times']) / q['p50']:.2f}x" if eager else "-"
        st = r["stages"]
        lines.append([str(b), name, f"{q['p50']:.1f}", f"{q['p90']:.1f}", f"{q['p99']:.1f}", f"{ips[1]:.3g}",
                      f"{st.get('unet_ms_per_step', float('nan')):.2f}", tflops,
                      f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-", ratio, vs_eager])
    headers = ["batch", "provider", "p50 ms", "p90 ms", "p99 ms", "images/s", "UNet ms/step", "TFLOP/s",
               "peak GiB", "vs diffusers", "vs eager"]
    guidance = cfg.guidance_mode if cfg.task == "generate" else \
        f"{cfg.guidance_mode}, 3 UNet rows per image (s_T {cfg.guidance_scale:g}, s_I {cfg.image_guidance_scale:g})"
    head = (f"device: {env['device']}   dtype: {env['dtype']}   git: {env['git_sha']}   task: {cfg.task}   "
            f"preset: {cfg.preset}   steps: {cfg.steps}   guidance: {guidance}   repeats: {cfg.repeats}"
            f"{' (interleaved)' if cfg.interleave else ''}")
    if cfg.adapters > 1:
        head += f"   adapters: {cfg.adapters}{' (regional masks)' if cfg.adapter_masks else ''}"
    stage_lines = []
    for (name, b), r in results.items():
        stage_lines.append(f"  {name:<16} batch {b}: " + ", ".join(f"{k.removesuffix('_ms')} {v:.1f} ms"
                                                                   for k, v in r["stages"].items()))
    if cfg.guidance_mode == "full" and any(n == "diffusers" for n, _ in results):
        head += ("\nguidance full: the engine runs 4 UNet rows per image, diffusers' CFG 2; "
                 "`vs diffusers` compares unequal work (simple guidance is the equal-work comparison)")
    text = "\n".join([head, "", format_table(headers, lines), "", "per-stage breakdown (last timed call):",
                      *stage_lines])
    return rows, text
