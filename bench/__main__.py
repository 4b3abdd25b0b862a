"""python -m bench {e2e, ops, quality, serve}: measured side by side with what users would pick instead."""
from __future__ import annotations

import argparse
import os
import sys

from ipadapter_instruct.engine.arguments import Parser
from ipadapter_instruct.engine.interrupt import interruptible
from ipadapter_instruct.engine.verbosity import add_verbose_arg, quiet_libraries
from ipadapter_instruct.engine.trt import CHOICES as TRT_CHOICES


def positive_ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def positive_floats(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {text!r}")
    return values


def build_parser() -> Parser:
    parser = Parser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    ops = sub.add_parser("ops", help="fused kernels vs two SDPA calls / xformers / reference, per SD1.5 shape")
    ops.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    ops.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                     help="default: float16 on cuda, float32 on cpu")
    ops.add_argument("--batch", type=positive_ints, default=[2, 4], help="batch sizes, e.g. 2,4 (default)")
    ops.add_argument("--repeats", type=int, default=None, help="timed calls per point (default: 50 cuda, 5 cpu)")
    ops.add_argument("--providers", default=None, help="comma-separated subset of fused,plugin,two-sdpa,xformers,reference")
    ops.add_argument("--json", default=os.path.join("out", "bench-ops.json"), help="where the result rows go")
    e2e = sub.add_parser("e2e", help="end-to-end request latency and throughput: engine vs diffusers (default)")
    add_e2e_args(e2e)
    from ipadapter_instruct.bench.quality_args import add_quality_args
    add_quality_args(sub.add_parser("quality", help="the paper's CLIP-I/T/P/S on a held-out manifest"))
    add_serve_args(sub.add_parser("serve", help="the HTTP server under load: engine (request- and step-level "
                                                "batching) vs engine-single vs diffusers"))
    for command in sub.choices.values():
        add_verbose_arg(command)
    return parser


def add_serve_args(p: argparse.ArgumentParser) -> None:
    from ipadapter_instruct.bench.serve_config import MIXES, SERVERS, ServeConfig, loopback_url
    from ipadapter_instruct.bench.e2e_config import PRESETS

    def rates(text: str) -> str | list[float]:
        return "auto" if text == "auto" else positive_floats(text)

    def url(text: str) -> str:
        try:
            return loopback_url(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    c = ServeConfig
    p.add_argument("--url", type=url, default=None,
                   help="measure this running server (127.0.0.1, localhost or [::1] only) instead of starting "
                        "the servers")
    p.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated subset of {','.join(SERVERS)}")
    p.add_argument("--preset", choices=PRESETS, default="tiny", help="the weights every server loads")
    p.add_argument("--concurrency", type=positive_ints, default=list(c.concurrency),
                   help="client workers per level, e.g. 1,4,8,16 (default)")
    p.add_argument("--requests", type=int, default=c.requests,
                   help="requests per server and level or rate (default 32)")
    p.add_argument("--steps", type=int, default=c.steps, help="denoising steps per request (default 10)")
    p.add_argument("--duration-s", type=float, default=None,
                   help="soak: the engine server alone at the highest concurrency for S seconds; RSS growth")
    p.add_argument("--timeout-s", type=float, default=c.timeout_s, help="per request, 429 retries included")
    p.add_argument("--max-batch-rows", type=int, default=c.max_batch_rows,
                   help="the engine and engine-step servers' batching")
    p.add_argument("--max-wait-ms", type=float, default=c.max_wait_ms, help="the engine servers' batching wait")
    p.add_argument("--arrival", choices=["closed", "poisson"], default=c.arrival,
                   help="closed: --concurrency workers, each sending its next request when answered (default); "
                        "poisson: open loop, requests arrive at random times at each of --rates")
    p.add_argument("--rates", type=rates, default="auto",
                   help="poisson: offered requests/s, e.g. 2,5,8; auto (default): --loads times what the engine "
                        "server sustains, measured first")
    p.add_argument("--loads", type=positive_floats, default=list(c.loads),
                   help="--rates auto: multiples of the measured capacity (default 0.5,0.9,1.2)")
    p.add_argument("--mix", choices=list(MIXES), default=c.mix,
                   help="same: every request --steps with simple guidance (default); mixed: by request index, also "
                        "full guidance and half and double steps (the same sequence for every server)")
    p.add_argument("--seed", type=int, default=c.seed, help="poisson: the arrival times' random seed")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="start the engine servers with serve --cuda-graphs (a CUDA GPU only; engine-step pads its "
                        "rows to power-of-two buckets, one capture each)")
    p.add_argument("--hostile", type=float, default=None, metavar="SHARE",
                   help="this share of the requests (e.g. 0.2) carries extreme values; reports whether any good "
                        "request's image changed against it sent alone (exit 1 if so) and the hostile ones refused")
    p.add_argument("--cache", default=None, help="where preset weights are built (default: ~/.cache/...)")
    p.add_argument("--json", default=os.path.join("out", "bench-serve.json"), help="where the result rows go")
    p.add_argument("--plot", default=None, help="PATH.png: latency (p50, p99) against offered load (poisson) or "
                                                "concurrency, one line per server")


def add_e2e_args(p: argparse.ArgumentParser) -> None:
    from ipadapter_instruct.engine.loading import SCHEDULERS

    from ipadapter_instruct.bench.e2e_config import ACCEPTED, PROVIDERS
    from ipadapter_instruct.bench.e2e_config import PRESETS

    p.add_argument("--task", choices=["generate", "edit", "img2img", "inpaint"], default="generate",
                   help="generate: IPAdapter-Instruct text-to-image (default); edit: InstructPix2Pix, a photo edited "
                        "by instruction (engine.EditPipeline vs diffusers' StableDiffusionInstructPix2PixPipeline, "
                        "3 UNet rows per image, guidance 7.5 / image guidance 1.5); img2img / inpaint: generate's "
                        "request from a photo (inpaint: and a mask, on a 9-channel inpainting model of the preset's "
                        "shapes) vs diffusers' StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline")
    p.add_argument("--strength", type=float, default=None,
                   help="img2img / inpaint: how far from the photo, in (0, 1] (default: diffusers' 0.8 / 1.0)")
    p.add_argument("--preset", choices=PRESETS, default="tiny",
                   help="tiny: toy weights (CPU-friendly); sd15: full SD1.5/ViT-H/16-token shapes, random weights "
                        "(edit: the SD1.5 UNet with 8 input channels, SD1.5's VAE and text encoder)")
    p.add_argument("--model", help="real weights: diffusers SD1.5 folder (with --image-encoder and --adapter); "
                                   "edit: a diffusers InstructPix2Pix folder, alone")
    p.add_argument("--image-encoder", help="CLIPVisionModelWithProjection folder")
    p.add_argument("--adapter", help="IPAdapter-Instruct file for the engine providers")
    p.add_argument("--plus-adapter", help="IP-Adapter+ file of the same base for the diffusers provider")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="default: float16 on cuda, float32 on cpu")
    p.add_argument("--batch", type=positive_ints, default=None, help="requests per call, e.g. 1,2,4 "
                   "(default: 1,4 on cuda, 1 on cpu)")
    p.add_argument("--steps", type=int, default=None, help="default: 30 on cuda, 10 on cpu, for both tasks "
                   "(InstructPix2Pix's own default is 100 steps)")
    p.add_argument("--height", type=int, default=None, help="default: the model's native size (edit: the photo is "
                   "resized to it: 64 px tiny, 512 px sd15)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--guidance-mode", choices=["simple", "full"], default=None,
                   help="generate: simple (2 UNet rows, equal work to diffusers' CFG; default) or full (4 rows)")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated subset of {','.join(ACCEPTED)} "
                   "(engine-lcm: the engine with the LCM scheduler at --few-steps, what an LCM-LoRA user runs)")
    p.add_argument("--scheduler", choices=["default", *SCHEDULERS], default="default",
                   help="every provider's scheduler (default: the model's own)")
    p.add_argument("--few-steps", type=int, default=4, help="the engine-lcm provider's steps (default 4)")
    p.add_argument("--adapters", type=int, default=1, metavar="N",
                   help="generate: N adapters at once on every provider (the adapter file N times; diffusers: "
                        "load_ip_adapter with lists), each reading the condition image")
    p.add_argument("--adapter-masks", action="store_true",
                   help="with --adapters: each adapter acts in its own vertical stripe of the image (regional masks)")
    p.add_argument("--engines", default=None, metavar="DIR",
                   help="the tensorrt provider's plans (`python -m export trt --out DIR` of the same weights; "
                        "default: exported and built once into the bench cache)")
    p.add_argument("--trt", choices=TRT_CHOICES, default="auto",
                   help="the tensorrt provider's TensorRT: full (`import tensorrt`; datacenter GPUs such as H100), rtx "
                        "(TensorRT for RTX; RTX GPUs) or auto (full where installed; --engines: the one that built "
                        "them)")
    p.add_argument("--ladder", action="store_true",
                   help="instead of --providers: the fast path one piece at a time, each step's effect in one run "
                        "(CUDA: engine-eager, +channels-last, +fused-attention, +fused-norms, +cuda-graphs, "
                        "+compile, each adding to the one before; CPU: engine-eager, then +channels-last, +bf16 and "
                        "+compile, each alone on top of engine-eager)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per point (default: 10 cuda, 3 cpu)")
    p.add_argument("--interleave", action="store_true",
                   help="load every provider at once and take their timed calls in turn (A, B, A, B, ...), so a "
                        "machine whose speed drifts (a shared VM) slows each alike; needs the memory of all of "
                        "them, and peak memory is not reported")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the engine provider's UNet (compile time shows in the warm-up line)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay the engine provider's UNet step from CUDA graphs (cuda only; capture in warm-up)")
    p.add_argument("--json", default=os.path.join("out", "bench-e2e.json"), help="where the result rows go")
    p.add_argument("--plot", default=None, help="PATH.png: latency and throughput against batch size")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="one more call per provider and batch under torch.profiler: Chrome traces and op tables in "
                        "DIR, and how often each stage ran (the engine's projector and K/V once per request)")
    p.add_argument("--cache", default=None, help="where preset weights are built (default: ~/.cache/...)")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("ops", "e2e", "quality", "serve", "-h", "--help"):
        argv = ["e2e", *argv]  # `python -m bench [options]` runs the end-to-end benchmark
    a = build_parser().parse_args(argv)
    quiet_libraries(a.verbose)
    message = f"python -m bench {a.command}: interrupted (Ctrl-C): stopped, no results written"
    return interruptible(lambda: command(a), message)  # Ctrl-C: one line, exit 130


def command(a) -> int:
    if a.command == "e2e":
        return run_e2e_command(a)
    if a.command == "quality":
        from ipadapter_instruct.bench.quality import quality_main
        return quality_main(a)
    if a.command == "serve":
        from ipadapter_instruct.bench.serve import serve_main
        return serve_main(a)
    from ipadapter_instruct.bench.common import write_json
    from ipadapter_instruct.bench.ops import run_ops
    import torch  # deferred: heavy, and `--help` needs none of it

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        return fail("--device cuda but no CUDA GPU is available")
    dtype = getattr(torch, a.dtype or ("float16" if device.type == "cuda" else "float32"))
    repeats = a.repeats or (50 if device.type == "cuda" else 5)
    wanted = a.providers.split(",") if a.providers else None
    from ipadapter_instruct.bench.ops import OPS_PROVIDERS
    unknown = [p for p in wanted or () if p not in OPS_PROVIDERS]
    if unknown:
        return fail(f"unknown provider(s) {', '.join(unknown)}; choose from {', '.join(OPS_PROVIDERS)}")
    rows, table = run_ops(device, dtype, a.batch, repeats, wanted)
    print(table)
    write_json(rows, a.json)
    print(f"\n{len(rows)} rows written to {a.json}")
    return 0


def fail(message: str) -> int:
    print(f"python -m bench: error: {message}", file=sys.stderr)
    return 2


def run_e2e_command(a) -> int:
    from ipadapter_instruct.bench.common import write_json
    from ipadapter_instruct.bench.e2e import run_e2e
    from ipadapter_instruct.bench.e2e_config import ACCEPTED, E2EConfig, ladder
    from ipadapter_instruct.bench.weights import bench_weights
    import torch  # deferred: heavy, and `--help` needs none of it

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        return fail("--device cuda but no CUDA GPU is available")
    if a.cuda_graphs and device.type != "cuda":
        return fail("--cuda-graphs needs --device cuda")
    providers = tuple(ladder(device)) if a.ladder else tuple(p for p in a.providers.split(",") if p)
    unknown = [p for p in providers if p not in ACCEPTED]
    if unknown or not providers:
        return fail(f"unknown provider(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ACCEPTED)}")
    edit = a.task == "edit"
    if edit and edit_conflicts(a, providers):
        return fail(edit_conflicts(a, providers))
    if start_conflicts(a, providers):
        return fail(start_conflicts(a, providers))
    if a.adapters < 1 or (a.adapter_masks and a.adapters < 2):
        return fail("--adapters takes a positive count, and --adapter-masks needs --adapters 2 or more")
    if a.trt != "auto" and "tensorrt" not in providers:
        return fail(f"--trt {a.trt} chooses the tensorrt provider's TensorRT: add tensorrt to --providers, or drop "
                    "--trt")
    if a.adapters > 1 and (edit or "tensorrt" in providers):
        return fail("--adapters N > 1 is for the generate task on the PyTorch providers (the TensorRT engines and "
                    "editing hold one adapter)")
    real = [a.model] if edit else [a.model, a.image_encoder, a.adapter]
    if any(real) and not all(real):
        return fail("give all of --model, --image-encoder and --adapter for real weights, or none for a preset")
    if all(real) and not edit:
        paths = dict(model=a.model, image_encoder=a.image_encoder, adapter=a.adapter, plus_adapter=a.plus_adapter)
        if "diffusers" in providers and not a.plus_adapter:
            return fail("the diffusers provider needs --plus-adapter (an IP-Adapter+ file): diffusers cannot load "
                        "IPAdapter-Instruct; or leave it out of --providers")
    elif all(real):
        paths = dict(model=a.model)
    else:
        paths = bench_weights(a.preset, a.cache, a.task)
    cuda = device.type == "cuda"
    task = dict(task="edit", guidance_mode="ip2p", guidance_scale=7.5) if edit else \
        dict(task=a.task, strength=a.strength, guidance_mode=a.guidance_mode or "simple")  # 7.5: IP2P's default
    cfg = E2EConfig(preset="real" if all(real) else a.preset, device=str(device),
                    dtype=a.dtype or ("float16" if cuda else "float32"),
                    batches=tuple(a.batch or ((1, 4) if cuda else (1,))),
                    steps=a.steps or (30 if cuda else 10), height=a.height, width=a.width,
                    providers=providers, repeats=a.repeats or (10 if cuda else 3), compile=a.compile,
                    cuda_graphs=a.cuda_graphs, interleave=a.interleave, profile_dir=a.profile, engines=a.engines,
                    trt=a.trt,
                    scheduler=None if a.scheduler == "default" else a.scheduler, few_steps=a.few_steps,
                    adapters=a.adapters, adapter_masks=a.adapter_masks, **task)
    rows, table = run_e2e(cfg, paths)
    print()
    print(table)
    write_json(rows, a.json)
    print(f"\n{len(rows)} rows written to {a.json}")
    if a.plot:
        from ipadapter_instruct.bench.plot import plot_e2e
        plot_e2e(rows, a.plot)
        print(f"plot written to {a.plot}")
    return 0


def start_conflicts(a, providers) -> str | None:
    """What the img2img / inpaint tasks cannot take, or None (every task: --strength is theirs)."""
    if a.strength is not None and a.task not in ("img2img", "inpaint"):
        return "--strength is the img2img / inpaint tasks' (how far from the photo): add --task img2img or inpaint"
    if a.strength is not None and not 0.0 < a.strength <= 1.0:
        return f"--strength must be in (0, 1], got {a.strength:g}"
    if a.task in ("img2img", "inpaint") and "tensorrt" in providers:
        return f"the tensorrt provider runs the generate task only (--task {a.task} is not measured there yet)"
    if a.task in ("img2img", "inpaint") and a.preset in ("tiny-sdxl", "sdxl"):
        return f"--task {a.task} runs on the SD1.5 presets (tiny, sd15); SDXL's is not wired into the bench yet"
    if a.task == "inpaint" and a.model:
        return "--task inpaint runs on the preset's inpainting weights (real weights: not wired into the bench yet)"
    return None


def edit_conflicts(a, providers) -> str | None:
    """What the edit task cannot take, or None."""
    if a.guidance_mode:
        return "--guidance-mode is the generate task's: --task edit runs InstructPix2Pix's three guidance branches"
    if a.image_encoder or a.adapter or a.plus_adapter:
        return "--task edit takes --model alone (a diffusers InstructPix2Pix folder), no adapter or image encoder"
    if "tensorrt" in providers:
        return "the tensorrt provider runs the generate task only (no TensorRT edit runtime is built yet)"
    return None


if __name__ == "__main__":
    sys.exit(main())
