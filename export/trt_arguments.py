"""`python -m export trt`'s flags, apart from the build so that `--help` imports no torch."""
from __future__ import annotations

from ipadapter_instruct.engine.graph_names import GRAPHS
from ipadapter_instruct.engine.trt import CHOICES, RTX_CCS, RTX_DEFAULT_CCS
from ipadapter_instruct.export.profiles import BOUNDS


def add_arguments(p) -> None:
    p.add_argument("dir", help="the ONNX export folder (manifest.json and NAME.onnx, from `python -m export onnx`)")
    p.add_argument("--out", default=None, help="where NAME.plan, engines.json and plugin/ go (default: DIR)")
    p.add_argument("--fp16", action="store_true",
                   help="let TensorRT pick half-precision kernels in a float32 export (TensorRT 10.x weak typing; "
                        "with TensorRT for RTX build a `--dtype float16` export instead)")
    p.add_argument("--no-tf32", dest="tf32", action="store_false",
                   help="keep float32 layers off TF32 tensor cores (TensorRT's default lets them use TF32), e.g. to "
                        "compare with PyTorch at fp32 precision")
    p.add_argument("--graphs", default=None, help=f"comma-separated subset (default: every graph of the manifest: "
                   f"{', '.join(GRAPHS)}, and controlnet, controlnet_1, ... in an export with ControlNets)")
    p.add_argument("--trt", choices=CHOICES, default="auto",
                   help="which TensorRT builds: full (`import tensorrt`, on the GPU the plans will run on: A100, H100, "
                        "H200, ...), rtx (TensorRT for RTX, no GPU needed; RTX GPUs), or auto (full where installed)")
    p.add_argument("--arch", type=int, action="append", default=None, metavar="CC",
                   help="compute capability the plans and the plugin's cubins are built for, as 86 for 8.6, "
                        f"repeatable. TensorRT for RTX: any of {', '.join(map(str, RTX_CCS))} (default "
                        f"{', '.join(map(str, RTX_DEFAULT_CCS))}; 75 on its own, from a float16 export); the full "
                        "TensorRT: the building GPU's (its default and only choice)")
    p.add_argument("--plugin-library", default=None, metavar="SO",
                   help="import the adapter attention with this C++ plugin library (export/cpp, "
                        "`make -C export/cpp plugin`) and embed it in the plans, in place of the Python plugin")
    for b in BOUNDS:
        p.add_argument(f"--{b}", action="append", default=[], metavar="NAME:DxD,...",
                       help=f"{b} shapes of the profile in trtexec syntax, e.g. sample:2x4x64x64 (repeatable or "
                            f"comma-separated; default: the manifest's)")
