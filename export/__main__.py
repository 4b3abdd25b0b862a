"""python -m export {onnx, verify, run, plugin, trt}: the adapter UNet for TensorRT (docs/export-tensorrt-cpp.md)."""
from __future__ import annotations

import logging
import os
import sys

from ipadapter_instruct.engine.arguments import Parser
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.interrupt import interruptible
from ipadapter_instruct.engine.verbosity import add_verbose_arg, quiet_libraries


def add_source_args(p, names) -> None:
    """--model/--image-encoder/--adapter: where the weights are now, when they moved away from the export."""
    from ipadapter_instruct.engine.graph_names import SOURCES

    for name in names:
        p.add_argument(SOURCES[name], default=None, help=f"the export's {name.replace('_', ' ')}, in place of the "
                       f"manifest's (default: the manifest's, relative to DIR)")


def _run_arguments(ru) -> None:
    """`python -m export run`'s flags."""
    from ipadapter_instruct.engine.arguments import int_pair

    ru.add_argument("dir")
    ru.add_argument("--prompt", required=True)
    ru.add_argument("--ip-adapter-image", "--image", dest="image", required=True, metavar="PATH",
                    help="the adapter's reference image (--image: the old name)")
    ru.add_argument("--instruct", default=None, help="what to take from the image (IPAdapter-Instruct)")
    ru.add_argument("--negative-prompt", default=None)
    ru.add_argument("--scale", type=float, default=0.8, help="adapter strength (default 0.8)")
    ru.add_argument("--num-inference-steps", "--steps", dest="steps", type=int, default=30, metavar="N",
                    help="denoising steps (--steps: the old name)")
    ru.add_argument("--seed", type=int, default=None, help="default: a fresh random seed, printed on stderr")
    ru.add_argument("--init-image", default=None, metavar="PATH",
                    help="start from this photo: img2img, or inpainting with --mask (the export needs vae_encoder: "
                         "an inpainting model's has it, a text-to-image one with `onnx --img2img`)")
    ru.add_argument("--strength", type=float, default=None, metavar="F",
                    help="how far from the photo, in (0, 1] (default 0.8 for img2img, 1.0 for inpainting)")
    ru.add_argument("--mask", default=None, metavar="PATH",
                    help="inpainting mask, the photo's size: white is repainted, black kept")
    ru.add_argument("--control-image", action="append", default=None, metavar="PATH",
                    help="control image of an export with ControlNets, one per net in the export's order")
    ru.add_argument("--controlnet-scale", type=float, action="append", default=None, metavar="F",
                    help="conditioning scale, once or once per net (default 1.0)")
    for flag, what in (("--original-size", "H,W (default: the output size)"),
                       ("--target-size", "H,W (default: the output size)"), ("--crops-top-left", "T,L (default 0,0)")):
        ru.add_argument(flag, type=int_pair, default=None, metavar=what.split()[0],
                        help=f"an SDXL export only: size conditioning, {what}")
    ru.add_argument("--out", required=True, help="output .png")
    add_source_args(ru, ("model", "image_encoder"))


def _parser() -> Parser:
    from ipadapter_instruct.engine.graph_names import DEFAULT_OPSET, EDIT_GRAPHS, GRAPHS
    from ipadapter_instruct.export.plugin import ARCHS, DTYPES, HEAD_DIMS, HEADS

    p = Parser(prog="python -m export", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    on = sub.add_parser("onnx", help="write the five ONNX graphs (six for InstructPix2Pix; and one per ControlNet) "
                        "and manifest.json")
    on.add_argument("--model", required=True, help="diffusers Stable Diffusion 1.5 folder, or an InstructPix2Pix "
                    "or inpainting one (adds vae_encoder)")
    on.add_argument("--image-encoder", required=True, help="CLIP vision folder")
    on.add_argument("--adapter", required=True, help="two-key adapter file (.bin or .safetensors)")
    on.add_argument("--out", required=True, help="output folder")
    on.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    on.add_argument("--attention", choices=("plugin", "onnx"), default="plugin",
                    help="adapter attention as the TensorRT plugin node (default) or in standard ONNX ops")
    on.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    on.add_argument("--graphs", default=None, help=f"comma-separated subset (default: all of {', '.join(GRAPHS)}; "
                    f"and {EDIT_GRAPHS[-1]} for an InstructPix2Pix or inpainting model or with --img2img, "
                    "controlnet, controlnet_1, ... with --controlnet)")
    on.add_argument("--img2img", action="store_true",
                    help=f"also export {EDIT_GRAPHS[-1]} (the photo's latent distribution), which the runtimes need "
                    "to start from a photo: img2img and inpainting on a text-to-image model (an InstructPix2Pix or "
                    "inpainting model always has it)")
    on.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="where to trace (default: cuda when present; fp16 tracing on a CPU takes minutes for SD1.5)")
    on.add_argument("--controlnet", action="append", default=None, metavar="DIR",
                    help="diffusers ControlNetModel folder, repeatable: a controlnet graph per net (controlnet, "
                         "controlnet_1, ...) and the residual inputs on the UNet graph")
    ve = sub.add_parser("verify", help="run every graph with ONNX Runtime against PyTorch")
    ve.add_argument("dir")
    ve.add_argument("--batch", type=int, default=None, help="rows (default: each graph's opt profile)")
    ve.add_argument("--height", type=int, default=None, help="pixels (default: the opt profile)")
    ve.add_argument("--width", type=int, default=None, help="pixels (default: the opt profile)")
    ve.add_argument("--graphs", default=None, help="comma-separated subset (default: every graph in DIR)")
    ve.add_argument("--atol", type=float, default=None, help="absolute tolerance (fp32 1e-4, fp16 1e-2)")
    ve.add_argument("--rtol", type=float, default=None, help="tolerance relative to the output's max (same)")
    add_source_args(ve, ("model", "image_encoder", "adapter"))
    ve.add_argument("--controlnet", action="append", default=None, metavar="DIR",
                    help="the export's ControlNet folders, one per net in its order, in place of the manifest's")
    ru = sub.add_parser("run", help="generate from an export folder with ONNX Runtime (the reference loop)")
    _run_arguments(ru)
    pl = sub.add_parser("plugin", help="compile the plugin's attention kernels (cubin + PTX) and their index")
    pl.add_argument("--out", required=True)
    pl.add_argument("--arch", type=int, choices=ARCHS, action="append", help="repeatable; default: all")
    pl.add_argument("--dtype", choices=DTYPES, action="append", help="repeatable; default: all")
    pl.add_argument("--head-dim", type=int, choices=HEAD_DIMS, action="append", help="repeatable; default: all")
    pl.add_argument("--heads", type=int, default=HEADS, help=f"attention heads (default {HEADS}, SD1.5)")
    from ipadapter_instruct.export.trt_arguments import add_arguments  # light: the build's imports stay in export/trt.py

    add_arguments(sub.add_parser("trt", help="build TensorRT engines (.plan) from an onnx folder, on this machine (TensorRT for RTX needs no GPU)"))
    for command in sub.choices.values():
        add_verbose_arg(command)
    return p


WRITTEN = {"onnx": ", no graph written", "trt": ", no plan written", "run": ", no image written"}


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries(a.verbose)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is what kernels/aot.py measures
    message = f"python -m export {a.command}: interrupted (Ctrl-C): stopped{WRITTEN.get(a.command, '')}"
    return interruptible(lambda: command(a), message)  # Ctrl-C: one line, exit 130


def command(a) -> int:
    try:
        if a.command == "onnx":
            from ipadapter_instruct.export.onnx import export_onnx
            print(export_onnx(a.model, a.image_encoder, a.adapter, a.out, a.opset, a.attention, a.dtype,
                              tuple(g for g in (a.graphs or "").split(",") if g), a.device,
                              controlnet=a.controlnet, img2img=a.img2img))
            return 0
        if a.command == "verify":
            from ipadapter_instruct.export.verify import verify
            rows = verify(a.dir, a.batch, a.height, a.width, a.graphs.split(",") if a.graphs else None,
                          a.atol, a.rtol, sources=dict(model=a.model, image_encoder=a.image_encoder,
                                                       adapter=a.adapter, controlnet=a.controlnet))
            bad = [r for r in rows if not r["ok"]]
            print(f"{len(rows) - len(bad)}/{len(rows)} checks within tolerance")
            return 1 if bad else 0
        if a.command == "run":
            from ipadapter_instruct.engine.output import output_paths, write_images
            from ipadapter_instruct.engine import DEFAULT_NEGATIVE
            from ipadapter_instruct.engine.loading import load_image

            from ipadapter_instruct.export.onnx_runtime import OnnxPipeline
            paths = output_paths(a.out, 1)
            image = load_image(a.image)
            pipe = OnnxPipeline.from_export(a.dir, a.model, a.image_encoder)
            control = {}
            if a.control_image:
                if not pipe.controlnets:
                    raise EngineError(f"{a.dir} has no controlnet graph: --control-image needs an export made with "
                                      "--controlnet")
                controls = [load_image(p, "control image") for p in a.control_image]
                scale = a.controlnet_scale or [1.0]
                control = dict(control_image=controls if len(controls) > 1 else controls[0],
                               controlnet_conditioning_scale=scale if len(scale) > 1 else scale[0])
            sizes = {k: v for k, v in (("original_size", a.original_size), ("target_size", a.target_size),
                                       ("crops_coords_top_left", a.crops_top_left)) if v is not None}
            if sizes and pipe.kind != "sdxl":
                raise EngineError("--original-size, --target-size and --crops-top-left are SDXL's size conditioning; "
                                  f"{a.dir} is not an SDXL export")
            photo = {k: v for k, v in (("init_image", a.init_image), ("mask_image", a.mask),
                                       ("strength", a.strength)) if v is not None}
            images = pipe(a.prompt, image, a.instruct, a.negative_prompt or DEFAULT_NEGATIVE, scale=a.scale,
                          num_inference_steps=a.steps, seed=a.seed, **control, **sizes, **photo)
            params = dict(prompt=a.prompt, negative_prompt=a.negative_prompt or DEFAULT_NEGATIVE, instruct=a.instruct,
                          num_inference_steps=a.steps, seed=images.seeds[0], width=images[0].width,
                          height=images[0].height, model=os.path.basename(os.path.normpath(a.dir)))
            write_images(images, paths, params=[params])
            print(f"{paths[0]} ({', '.join(f'{k} {v:.0f} ms' for k, v in pipe.timings.items())})")
            print(f"seed: {images.seeds[0]}", file=sys.stderr)
            return 0
        if a.command == "trt":
            from ipadapter_instruct.export import trt
            return trt.run(a)
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            print("python -m export plugin: error: unset TRITON_INTERPRET (the interpreter cannot compile)",
                  file=sys.stderr)
            return 2
        from ipadapter_instruct.export.plugin import ARCHS, DTYPES, HEAD_DIMS, write_plugin
        print(write_plugin(a.out, tuple(a.arch or ARCHS), tuple(a.dtype or DTYPES), tuple(a.head_dim or HEAD_DIMS),
                           a.heads))
        return 0
    except EngineError as e:
        print(f"python -m export {a.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
