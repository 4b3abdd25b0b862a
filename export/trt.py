"""`python -m export trt DIR`: TensorRT engines (DIR/NAME.plan) from the ONNX export in DIR (manifest.json).

The adapter cross-attention nodes (op DecoupledAttention, plugin_namespace ipadapter_instruct, aot=1) become the
`tensorrt.plugin` defined in `register_plugin`: its ahead-of-time implementation compiles the packed Triton kernel
(kernels/packed_attention.py, export/plugin.py) to PTX for the GPU the engine is built on, so the engine runs on the
plain TensorRT runtime (trtexec, C++) with no Python. Its JIT implementation launches the same kernel from PyTorch.

No parser flag or builder setting is needed for that: TensorRT's ONNX parser maps an op it does not know to the
plugin registered under the node's op type, `plugin_version` (default "1") and `plugin_namespace` attribute, and
the node's `aot` attribute picks the AOT implementation. An AOT plugin's kernel is stored in the engine
(`plugins_to_serialize` is for plugin libraries, and kENABLE_PLUGIN_OVERRIDE for replacing built-in ops; neither
applies). Without `aot` the JIT path is taken and the engine then needs Python and `register_plugin()` to run.

Everything that decides a number (dtype, head size, grid, block, shared memory, the int32 arguments, profiles,
the shape syntax) is a plain function, tested without TensorRT; the TensorRT calls are written from its
documentation. TensorRT is imported inside the functions that need it, never at import time.
"""
# (no `from __future__ import annotations`: tensorrt.plugin reads the decorated functions' annotations as classes)
import functools
import os
import re
import sys
import time

from engine.errors import EngineError

from .onnx import read_manifest
from .plugin import PLUGIN

PLUGIN_ID = f"{PLUGIN['namespace']}::{PLUGIN['name']}"
BOUNDS = ("min", "opt", "max")
KERNEL_ARGS = ("Q", "K", "V", "KI", "VI", "Scale", "Lq", "Lt", "Li", "Out")  # what TensorRT passes, in order
EXTRA_ARGS = ("Lq", "Lt", "Li")  # the int32 arguments, resolved from the input shapes at run time
NOT_INSTALLED = ("TensorRT is not installed here: the registry's tensorrt-*-libs wheels are stubs that download "
                 "from NVIDIA's index, which is unreachable; build engines where TensorRT 10.x is installed")
_DTYPES = {"FLOAT": "float32", "HALF": "float16", "float32": "float32", "float16": "float16"}
_REGISTERED = []


def tensorrt_unavailable() -> str | None:
    """None when TensorRT with `tensorrt.plugin.aot_impl` imports, else why not (one line)."""
    try:
        import tensorrt
    except Exception as e:  # ImportError, or OSError from a bindings wheel without its libraries
        return f"{NOT_INSTALLED} ({_first_line(e)})"
    version = getattr(tensorrt, "__version__", "?")
    try:
        import tensorrt.plugin as trtp
    except Exception as e:
        return f"TensorRT {version} has no usable tensorrt.plugin ({_first_line(e)}); build with TensorRT 10.x"
    if not version.split(".")[0].isdigit() or int(version.split(".")[0]) < 10 or not hasattr(trtp, "aot_impl"):
        return f"TensorRT {version} has no tensorrt.plugin.aot_impl; build engines with a TensorRT 10.x that has it"
    return None


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"


def tensorrt_runtime_unavailable() -> str:
    """Why `--backend tensorrt` cannot run (engine, bench): TensorRT is missing, or the runtime is not built."""
    return tensorrt_unavailable() or ("the engine's TensorRT runtime (running the .plan files of "
                                      "`python -m export trt`) is not built yet; use --backend pytorch")


# ----- the plugin's launch, as plain values ------------------------------------------------------------------

def plugin_dtype(name: str) -> str:
    """TensorRT's DataType name (FLOAT, HALF) or a torch dtype name -> the variant dtype of export/plugin.py."""
    if name not in _DTYPES:
        raise EngineError(f"the DecoupledAttention plugin takes FLOAT or HALF (float32/float16) tensors, got {name}")
    return _DTYPES[name]


def head_dim(width: int, heads: int) -> int:
    if heads < 1 or width % heads:
        raise EngineError(f"DecoupledAttention: width {width} is not a multiple of num_heads={heads}")
    return width // heads


def autotune_types() -> str:
    """I/O types in AutoTuneCombination syntax: q, k, v, k_ip, v_ip and out all FP32 or all FP16; ip_scale FP32."""
    return ",".join(["FP32|FP16"] * 5 + ["FP32", "FP32|FP16"])


def grid(batch, lq, block_m: int, heads: int, cdiv):
    """(x, y, z) blocks: one per BLOCK_M queries, per batch row and head. Works on ints and on TensorRT's symbolic
    shape expressions alike (`cdiv` is ceil-division for the kind given)."""
    return cdiv(lq, block_m), batch * heads, 1


def extra_args(q_shape, k_shape, k_ip_shape) -> tuple:
    """The kernel's int32 arguments (Lq, Lt, Li) from the shapes (B, L, H*D) of q, k and k_ip."""
    return q_shape[1], k_shape[1], k_ip_shape[1]


def trim_scratch(ptx: str, entry: str, keep: int) -> str:
    """Drop the parameters Triton appends after the kernel's own (global/profile scratch pointers) when the body
    never reads them: TensorRT launches with exactly the inputs, the int32 arguments and the outputs."""
    head, sep, rest = ptx.partition(f".entry {entry}(")
    params, close, body = rest.partition(")")
    if not sep or not close:
        raise EngineError(f"entry {entry} not found in the PTX")
    decls = [p.strip() for p in params.split(",") if p.strip()]
    for d in decls[keep:]:
        name = d.split()[-1]
        if re.search(rf"\b{re.escape(name)}\b", body):
            raise EngineError(f"{entry} reads its extra parameter {name}, which TensorRT's AOT launch cannot pass")
    return head + sep + "\n\t" + ",\n\t".join(decls[:keep]) + "\n" + close + body


@functools.lru_cache(maxsize=None)
def aot_launch(dtype: str, heads: int, width: int, arch: int) -> dict:
    """Compile the packed kernel for (dtype, heads, width) on sm_`arch` with Triton (no GPU needed; TRITON_INTERPRET
    must be unset) -> kernel_name, ptx (trimmed to the launch's parameters), block_m, threads, shared_mem."""
    from kernels._runtime import interpreting
    from kernels.aot import compile_kernel, packed_variant


    if interpreting():
        raise EngineError("unset TRITON_INTERPRET: the plugin's kernel must be compiled, not interpreted")
    dtype, d = plugin_dtype(dtype), head_dim(width, heads)
    v = packed_variant(dtype, heads, d)
    k = compile_kernel(v, arch)
    meta = k.metadata
    return dict(kernel_name=meta.name, ptx=trim_scratch(k.asm["ptx"], meta.name, len(KERNEL_ARGS)), dtype=dtype,
                heads=heads, head_dim=d, block_m=v["constexprs"]["BLOCK_M"], threads=meta.num_warps * 32,
                shared_mem=meta.shared)


def launch_numbers(launch: dict, b: int, lq: int, lt: int, li: int) -> dict:
    """The launch TensorRT makes for concrete shapes: grid, block, shared memory and the int32 arguments."""
    return dict(grid=grid(b, lq, launch["block_m"], launch["heads"], lambda a, m: -(-a // m)),
                block=(launch["threads"], 1, 1), shared_mem=launch["shared_mem"],
                extra_args=extra_args((b, lq), (b, lt), (b, li)))


def cuda_arch() -> int:
    import torch

    if not torch.cuda.is_available():
        raise EngineError("building the plugin's kernel needs the CUDA GPU the engine is built for")
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


# ----- the tensorrt.plugin definition -----------------------------------------------------------------------

def register_plugin() -> None:
    """Define ipadapter_instruct::DecoupledAttention for TensorRT (shape, autotune, JIT and AOT); idempotent."""
    if _REGISTERED:
        return
    import tensorrt.plugin as trtp

    TD = trtp.TensorDesc

    @trtp.register(PLUGIN_ID)
    def _shape(q: TD, k: TD, v: TD, k_ip: TD, v_ip: TD, ip_scale: TD, num_heads: int) -> TD:
        return q.like()

    @trtp.autotune(PLUGIN_ID)
    def _autotune(q: TD, k: TD, v: TD, k_ip: TD, v_ip: TD, ip_scale: TD, num_heads: int,
                  outputs: tuple[TD]) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(autotune_types(), ",".join(["LINEAR"] * 7))]

    @trtp.impl(PLUGIN_ID)
    def _impl(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, k_ip: trtp.Tensor, v_ip: trtp.Tensor,
              ip_scale: trtp.Tensor, num_heads: int, outputs: tuple[trtp.Tensor], stream: int) -> None:
        import torch

        from kernels.packed_attention import packed_attention

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            args = [torch.as_tensor(t, device="cuda") for t in (q, k, v, k_ip, v_ip, ip_scale)]
            torch.as_tensor(outputs[0], device="cuda").copy_(packed_attention(*args, num_heads))

    @trtp.aot_impl(PLUGIN_ID)
    def _aot_impl(q: TD, k: TD, v: TD, k_ip: TD, v_ip: TD, ip_scale: TD, num_heads: int, outputs: tuple[TD],
                  tactic: int) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        width = q.shape_expr[2]
        if width.is_fake or not width.is_constant:
            raise EngineError("DecoupledAttention needs a fixed width (H*D) in q's last dimension")
        launch = aot_launch(q.dtype.name, num_heads, width.constant_value(), cuda_arch())
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = grid(q.shape_expr[0], q.shape_expr[1], launch["block_m"],
                                                           num_heads, trtp.cdiv)
        params.block_x, params.shared_mem = launch["threads"], launch["shared_mem"]
        sizes = extra_args(q.shape_expr, k.shape_expr, k_ip.shape_expr)
        return (launch["kernel_name"].encode(), launch["ptx"].encode(), params,
                trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in sizes]))

    _REGISTERED.append(PLUGIN_ID)


# ----- manifest, shapes and profiles --------------------------------------------------------------------------

def _dims(shape) -> str:
    return "x".join(str(d) for d in shape)


def parse_shapes(values, flag: str) -> dict[str, tuple[int, ...]]:
    """trtexec's shape syntax, from repeated and/or comma-separated flags: ["sample:2x4x64x64,timestep:2"]."""
    out = {}
    for value in values or ():
        for piece in (p.strip() for p in value.split(",")):
            if not piece:
                continue
            name, sep, dims = piece.rpartition(":")
            try:
                shape = tuple(int(d) for d in dims.split("x"))
            except ValueError:
                shape = ()
            if not sep or not name or not shape or min(shape) < 1:
                raise EngineError(f"bad {flag} shape {piece!r}: expected NAME:DxDx... with positive integers, "
                                  f"e.g. sample:2x4x64x64")
            if name in out:
                raise EngineError(f"{flag} gives {name} twice")
            out[name] = shape
    return out


def graph_profiles(manifest: dict, shapes: dict | None = None) -> dict:
    """{graph: {input: (min, opt, max)}}: the manifest's profiles with the user's shapes ({"min": {name: dims}})
    over them; every input checked for rank, fixed dimensions and min <= opt <= max."""
    shapes = shapes or {}
    out, names = {}, set()
    for gname, g in manifest["graphs"].items():
        out[gname] = {}
        for inp in g["inputs"]:
            name, axes = inp["name"], inp["shape"]
            names.add(name)
            bounds = []
            for b in BOUNDS:
                dims = shapes.get(b, {}).get(name) or g["profiles"].get(b, {}).get(name)
                if dims is None and all(isinstance(a, int) for a in axes):
                    dims = axes
                if dims is None:
                    raise EngineError(f"{gname}: no {b} shape for input {name}; give --{b} {name}:DxD...")
                dims = tuple(int(d) for d in dims)
                if len(dims) != len(axes) or any(isinstance(a, int) and a != d for a, d in zip(axes, dims)):
                    raise EngineError(f"{gname}: {b} shape {_dims(dims)} for input {name} does not fit its shape "
                                      f"({'x'.join(str(a) for a in axes)})")
                bounds.append(dims)
            if not all(lo <= opt <= hi for lo, opt, hi in zip(*bounds)):
                raise EngineError(f"{gname}: input {name} needs min <= opt <= max in every dimension, got "
                                  f"{' / '.join(_dims(s) for s in bounds)}")
            out[gname][name] = tuple(bounds)
    unknown = sorted({n for b in BOUNDS for n in shapes.get(b, {})} - names)
    if unknown:
        raise EngineError(f"no graph has an input named {', '.join(unknown)}; "
                          f"the inputs are {', '.join(sorted(names))}")
    return out


def precision(manifest_dtype: str, fp16: bool, weak_typing: bool) -> str:
    """'strong': the graph's own types (a float16 export is already half); 'weak': BuilderFlag.FP16 lets TensorRT
    pick half kernels in a float32 export (TensorRT 10.x only: 11.x removed weak typing)."""
    if not fp16 or manifest_dtype == "float16":
        return "strong"
    if not weak_typing:
        raise EngineError("--fp16 on a float32 export needs TensorRT 10.x (11.x has no BuilderFlag.FP16); "
                          "export with `python -m export onnx --dtype float16` instead")
    return "weak"


def write_atomic(path: str, data) -> None:
    """Write to a temporary file beside `path`, then rename: a failed write leaves nothing behind."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ----- the build ----------------------------------------------------------------------------------------------

def build_engines(onnx_dir: str, out_dir: str | None = None, fp16: bool = False, shapes: dict | None = None,
                  log=print) -> list[str]:
    """One engine per graph of the manifest -> the .plan paths. shapes: {"min"|"opt"|"max": {input: dims}}."""
    manifest = read_manifest(onnx_dir)
    profiles = graph_profiles(manifest, shapes)
    reason = tensorrt_unavailable()
    if reason:
        raise EngineError(reason)
    import tensorrt as trt

    if manifest.get("attention") == "plugin":
        register_plugin()
    mode = precision(manifest.get("dtype", "float32"), fp16, hasattr(trt.BuilderFlag, "FP16"))
    out_dir = out_dir or onnx_dir
    os.makedirs(out_dir, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    written = []
    for name, g in manifest["graphs"].items():
        t0 = time.perf_counter()
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if mode == "strong" else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        onnx_path = os.path.join(onnx_dir, g["file"])
        if not parser.parse_from_file(onnx_path):  # (from the file: external weights resolve beside it)
            for i in range(parser.num_errors):
                log(f"{g['file']}: {' '.join(str(parser.get_error(i)).split())}")
            raise EngineError(f"{g['file']}: TensorRT's ONNX parser reported {parser.num_errors} error(s), above")
        config = builder.create_builder_config()
        if mode == "weak":
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        inputs = [network.get_input(i).name for i in range(network.num_inputs)]
        for inp in inputs:
            if inp not in profiles[name]:
                raise EngineError(f"{g['file']} has input {inp}, which the manifest does not list")
            profile.set_shape(inp, *profiles[name][inp])
        config.add_optimization_profile(profile)
        log(f"{name}: building ({mode} typing; " + ", ".join(
            f"{i} {' / '.join(_dims(s) for s in profiles[name][i])}" for i in inputs) + ")")
        data = builder.build_serialized_network(network, config)
        if data is None:
            raise EngineError(f"{name}: TensorRT could not build the engine (its log above says why)")
        path = os.path.join(out_dir, f"{name}.plan")
        write_atomic(path, data)
        log(f"{name}: {path}, {os.path.getsize(path) / 2 ** 20:.1f} MiB in {time.perf_counter() - t0:.0f} s")
        written.append(path)
    return written


# ----- CLI pieces (wired into `python -m export trt` by export/__main__.py) ----------------------------------

def add_arguments(p) -> None:
    p.add_argument("dir", help="the ONNX export folder (manifest.json and NAME.onnx, from `python -m export onnx`)")
    p.add_argument("--out", default=None, help="where NAME.plan go (default: DIR)")
    p.add_argument("--fp16", action="store_true",
                   help="let TensorRT pick half-precision kernels in a float32 export (TensorRT 10.x)")
    for b in BOUNDS:
        p.add_argument(f"--{b}", action="append", default=[], metavar="NAME:DxD,...",
                       help=f"{b} shapes of the profile in trtexec syntax, e.g. sample:2x4x64x64 (repeatable or "
                            f"comma-separated; default: the manifest's)")


def run(args) -> int:
    prog = "python -m export trt"
    try:
        manifest = read_manifest(args.dir)
        shapes = {b: parse_shapes(getattr(args, b, None), f"--{b}") for b in BOUNDS}
        graph_profiles(manifest, shapes)
    except EngineError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    reason = tensorrt_unavailable()
    if reason:
        print(f"{prog}: {reason}", file=sys.stderr)
        return 2
    try:
        build_engines(args.dir, args.out, args.fp16, shapes)
    except EngineError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    return 0
