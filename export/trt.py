"""`python -m export trt DIR`: one TensorRT engine (NAME.plan) per graph of the ONNX export in DIR, built with the
full TensorRT (`--trt full`: on the GPU the plans will run on, which it needs) or TensorRT for RTX (`--trt rtx`: on
any machine, no GPU needed, "CPU-only AOT"; the `export` extra installs it); `--trt auto` (the default) takes the
full TensorRT where it is installed (engine.trt.load_tensorrt).

--arch says which GPUs: compute capabilities as 86 for 8.6. TensorRT for RTX targets them in its builder config
(default RTX_DEFAULT_CCS: Ampere to Blackwell RTX GPUs, and the A100's 8.0); the full TensorRT's plans run on the
GPU model that built them only, so there --arch is that GPU's or absent. engines.json records the builder
(package, name, version) and these compute capabilities (and, for the full TensorRT, the GPU's name): the runtime
loads the plans with that builder and refuses another GPU in one line before deserialising anything.

The UNet's adapter cross-attention nodes (op DecoupledAttention, plugin_namespace ipadapter_instruct) are imported
by TensorRT's ONNX parser as the project's IPluginV3 plugin: the Python one (engine/trt/plugin.py) by default, or
the C++ library of export/cpp/ with --plugin-library, which is then embedded in every plan
(`plugins_to_serialize`) so that a C++ program needs nothing else. ip_scale stays a run-time input of unet.plan.
Either plugin launches the project's ahead-of-time cubins; the build compiles them with Triton for the compute
capabilities the plans are built for and the dtype, head count and head size of each plugin layer, into
OUT/plugin/ (a `python -m export plugin` folder).

OUT gets NAME.plan for each graph, engines.json (what was built, with what, for which GPUs, profiles, sizes, times),
manifest.json (the export's, its weight paths relative to OUT) and plugin/. Everything is built in a staging
folder inside OUT and moved in only when every graph built, so a failure (a missing or corrupt ONNX file, a parser
error, a profile TensorRT refuses) leaves no plan behind. Profiles: export/profiles.py; the output folder:
export/plan_folder.py.
"""
import os
import resource
import shutil
import sys
import time

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.interrupt import forget, polled, remove_if_killed, requested
from ipadapter_instruct.engine.trt import choice_of, flavour, load_tensorrt
from ipadapter_instruct.engine.trt.runtime import ENGINES_FORMAT
from ipadapter_instruct.engine.trt.support import build_targets, cc_list, cc_text, parse_cc, this_gpu

from ipadapter_instruct.export.onnx import read_manifest
from ipadapter_instruct.export.plan_folder import earlier_targets, keep_earlier_plans, publish, write_atomic, write_manifest
from ipadapter_instruct.export.plugin import PLUGIN
from ipadapter_instruct.export.profiles import BOUNDS, dims_text, graph_profiles, parse_shapes
from ipadapter_instruct.export.trt_arguments import add_arguments  # noqa: F401 (the flags, kept light for --help)


# ----- precision ----------------------------------------------------------------------------------------------

def precision(manifest_dtype: str, fp16: bool, weak_typing: bool) -> str:
    """'strong': the graph's own types (a float16 export is already half); 'weak': BuilderFlag.FP16 lets TensorRT
    pick half kernels in a float32 export (full TensorRT 10.x only: TensorRT for RTX and TensorRT 11 build
    strongly typed networks alone)."""
    if not fp16 or manifest_dtype == "float16":
        return "strong"
    if not weak_typing:
        raise EngineError("--fp16 on a float32 export needs TensorRT 10.x's weak typing, which this TensorRT lacks: "
                          "export with `python -m export onnx --dtype float16` and build that (no --fp16 needed)")
    return "weak"


# ----- the build ----------------------------------------------------------------------------------------------

def plugin_layers(trt, network, onnx_path: str) -> list[dict]:
    """The network's DecoupledAttention layers: name, dtype, heads (the ONNX node's num_heads) and width."""
    found = [network.get_layer(i) for i in range(network.num_layers)]
    found = [layer for layer in found if layer.type == trt.LayerType.PLUGIN_V3]
    if not found:
        return []
    import onnx

    heads = {}
    for node in onnx.load(onnx_path, load_external_data=False).graph.node:
        if node.op_type == PLUGIN["name"]:
            heads[node.name] = next((a.i for a in node.attribute if a.name == "num_heads"), 0)
    out = []
    for layer in found:
        inp = layer.get_input(0)
        width = inp.shape[len(inp.shape) - 1]
        if layer.name not in heads or width < 1:
            raise EngineError(f"plugin layer {layer.name}: no num_heads in the ONNX node or no fixed width ({width})")
        dtype = {"FLOAT": "float32", "HALF": "float16"}.get(inp.dtype.name)
        if dtype is None:
            raise EngineError(f"plugin layer {layer.name} takes {inp.dtype.name}; the plugin takes FLOAT or HALF")
        out.append(dict(name=layer.name, dtype=dtype, heads=heads[layer.name], width=width))
    return out


def _parse(trt, builder, logger, path: str, strong: bool, log):
    if not os.path.isfile(path):
        raise EngineError(f"{path} not found: export it again with `python -m export onnx`")
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strong else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(path):  # (from the file: external weights resolve beside it)
        errors = [" ".join(str(parser.get_error(i)).split()) for i in range(parser.num_errors)]
        for e in errors[1:]:
            log(f"{os.path.basename(path)}: {e}")
        raise EngineError(f"{os.path.basename(path)}: TensorRT's ONNX parser refused it: "
                          f"{errors[0][:300] if errors else 'no reason given'}")
    return network, parser


def build_engines(onnx_dir: str, out_dir: str | None = None, fp16: bool = False, shapes: dict | None = None,
                  graphs=None, archs=None, plugin_library: str | None = None, tf32: bool = True,
                  log=print, trt: str = "auto") -> list[str]:
    """One engine per graph of the manifest (or of `graphs`) -> the .plan paths in out_dir (default onnx_dir).
    shapes: {"min"|"opt"|"max": {input: dims}} over the manifest's profiles; archs: the compute capabilities the
    plans (and the plugin's cubins) are built for, as 86 for 8.6 (engine.trt.support.build_targets; None: the
    default); plugin_library: the C++ plugin (.so) to import and embed, in place of Python's; tf32: let float32
    layers use TF32 tensor cores (TensorRT's default; off for comparisons at fp32 precision); trt: auto, full or
    rtx, the TensorRT that builds (engine.trt.load_tensorrt)."""
    manifest = read_manifest(onnx_dir)
    names = list(graphs or manifest["graphs"])
    unknown = [g for g in names if g not in manifest["graphs"]]
    if unknown:
        raise EngineError(f"{onnx_dir} has no graph {', '.join(unknown)}; it has {', '.join(manifest['graphs'])}")
    profiles = graph_profiles({**manifest, "graphs": {g: manifest["graphs"][g] for g in names}}, shapes)
    for g in names:
        path = os.path.join(onnx_dir, manifest["graphs"][g]["file"])
        if not os.path.isfile(path):
            raise EngineError(f"{path} not found: export it again with `python -m export onnx`")
    if plugin_library is not None and not os.path.isfile(plugin_library):
        raise EngineError(f"plugin library not found: {plugin_library} (make -C export/cpp plugin builds it)")
    module = load_tensorrt(trt)
    gpu = this_gpu() if choice_of(module) == "full" else None  # full TensorRT builds for this GPU alone
    if archs is None and graphs and choice_of(module) == "rtx":  # a partial rebuild: for the plans already there
        archs = earlier_targets(out_dir or onnx_dir, module.__name__)
    built_by = {"package": module.__name__, "name": flavour(module), "version": module.__version__,
                "compute_capabilities": [cc_text(c) for c in build_targets(choice_of(module), archs, gpu)],
                "gpu": gpu[0] if gpu else None}
    mode = precision(manifest.get("dtype", "float32"), fp16, hasattr(module.BuilderFlag, "FP16"))
    plugin = manifest.get("attention") == "plugin"
    if plugin:
        if plugin_library is not None:
            if module.get_plugin_registry().load_library(os.path.abspath(plugin_library)) is None:
                raise EngineError(f"TensorRT could not load the plugin library {plugin_library} (its log says why)")
        else:
            from ipadapter_instruct.engine.trt.plugin import register_plugin
            register_plugin(module)
    out_dir = out_dir or onnx_dir
    os.makedirs(out_dir, exist_ok=True)
    staging = os.path.join(out_dir, f".trt-staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    remove_if_killed(staging)
    env_before = os.environ.get("IPADAPTER_INSTRUCT_PLUGIN_DIR")
    try:
        with polled():  # Ctrl-C cancels the build (TensorRT swallows a KeyboardInterrupt raised in its callbacks)
            index = _build_all(module, manifest, onnx_dir, names, profiles, mode, plugin, plugin_library, staging,
                               built_by, tf32, log)
        write_manifest(manifest, onnx_dir, out_dir, staging)
        keep_earlier_plans(index, out_dir, log)
        written = publish(staging, out_dir, index)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        forget(staging)
        if env_before is None:
            os.environ.pop("IPADAPTER_INSTRUCT_PLUGIN_DIR", None)
        else:
            os.environ["IPADAPTER_INSTRUCT_PLUGIN_DIR"] = env_before
    return written


def build_logger(trt, log):
    """A TensorRT logger passing warnings and errors to `log` and keeping the builder's engine layer listing (the
    VERBOSE "Layers:" message of a DETAILED build: the only layer information there is without a GPU)."""
    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.layers = []

        def log(self, severity, msg):
            if severity == trt.ILogger.Severity.VERBOSE:
                if msg.startswith("Layers:"):
                    self.layers = [line for line in msg.splitlines() if line.startswith("Name: ")]
            elif severity != trt.ILogger.Severity.INFO and not requested():  # (not "Build canceled" after Ctrl-C)
                log(f"TensorRT {severity.name.lower()}: {' '.join(str(msg).split())[:400]}")

    return Logger()


def cancel_monitor(trt):
    """A progress monitor that cancels the build once Ctrl-C came (engine.interrupt.requested): step_complete
    returning False is TensorRT's documented cancellation (IProgressMonitor); the builder then returns None. It is
    asked between the steps of each phase, so a long phase without steps still runs to its end."""
    class Monitor(trt.IProgressMonitor):
        phase_start = phase_finish = staticmethod(lambda *args: None)
        step_complete = staticmethod(lambda phase_name, step: not requested())

    return Monitor()


def engine_layers(listing: list[str]) -> dict:
    """From the builder's layer listing: how many layers the engine has and how many are our plugin."""
    return dict(layers=len(listing), plugin_layers=sum(PLUGIN["name"] in line and "LayerType: custom_layer" in line
                                                       for line in listing))


def _build_all(trt, manifest, onnx_dir, names, profiles, mode, plugin, plugin_library, staging, built_by, tf32,
               log) -> dict:
    logger = build_logger(trt, log)
    builder = trt.Builder(logger)
    archs = [parse_cc(c) for c in built_by["compute_capabilities"]]
    log(f"{flavour(trt)} {trt.__version__}: plans for compute capability {cc_list(archs)}"
        + (f" ({built_by['gpu']}, the GPU building them: full TensorRT's plans run on that GPU model only)"
           if built_by["gpu"] else ""))
    index = {"format": ENGINES_FORMAT, "tensorrt": built_by,
             "dtype": manifest.get("dtype", "float32"), "precision": mode, "tf32": tf32,
             "attention": manifest.get("attention"),
             "plugin_library": os.path.basename(plugin_library) if plugin and plugin_library else None,
             "plugin_dir": None, "archs": [], "graphs": {}}
    combos, monitor = set(), cancel_monitor(trt)
    for name in names:
        if requested():  # Ctrl-C between two graphs
            raise KeyboardInterrupt
        t0 = time.perf_counter()
        g = manifest["graphs"][name]
        onnx_path = os.path.join(onnx_dir, g["file"])
        network, parser = _parse(trt, builder, logger, onnx_path, mode == "strong", log)
        layers = plugin_layers(trt, network, onnx_path) if plugin else []
        new = {(p["dtype"], p["heads"], p["width"] // p["heads"]) for p in layers} - combos
        if new:  # cubins before the build: a TensorRT that times tactics on a GPU runs the plugin's enqueue
            combos |= new
            _write_cubins(staging, archs, combos)
        config = builder.create_builder_config()
        if choice_of(trt) == "rtx":
            target(trt, config, archs)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the layer listing, with the plugin's names
        config.progress_monitor = monitor
        logger.layers = []
        if mode == "weak":
            config.set_flag(trt.BuilderFlag.FP16)
        if not tf32:
            config.clear_flag(trt.BuilderFlag.TF32)
        if layers and plugin_library:
            config.plugins_to_serialize = [os.path.abspath(plugin_library)]
        profile = builder.create_optimization_profile()
        inputs = [network.get_input(i).name for i in range(network.num_inputs)]
        for inp in inputs:
            if inp not in profiles[name]:
                raise EngineError(f"{g['file']} has input {inp}, which the manifest does not list")
            profile.set_shape(inp, *profiles[name][inp])
        config.add_optimization_profile(profile)
        log(f"{name}: building with {flavour(trt)} {trt.__version__} ({mode} typing"
            + (f", {len(layers)} {PLUGIN['name']} plugin layers" if layers else "") + "; "
            + ", ".join(f"{i} {' / '.join(dims_text(s) for s in profiles[name][i])}" for i in inputs) + ")")
        data = builder.build_serialized_network(network, config)
        if requested():  # cancelled, or Ctrl-C came after the monitor's last step: no plan
            raise KeyboardInterrupt
        if data is None:
            raise EngineError(f"{name}: TensorRT could not build the engine (its log above says why)")
        path = os.path.join(staging, f"{name}.plan")
        write_atomic(path, data)
        seconds = time.perf_counter() - t0
        index["graphs"][name] = dict(file=f"{name}.plan", bytes=os.path.getsize(path), build_s=round(seconds, 2),
                                     inputs=inputs, plugin_layers=len(layers), engine=engine_layers(logger.layers),
                                     tf32=tf32,
                                     profile={i: [list(s) for s in profiles[name][i]] for i in inputs})
        log(f"{name}: {name}.plan, {os.path.getsize(path) / 2 ** 20:.1f} MiB in {seconds:.1f} s")
        del network, parser, config, data
    index["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if combos:
        index.update(plugin_dir="plugin", archs=[f"sm_{a}" for a in archs],
                     plugin_variants=[dict(dtype=t, heads=h, head_dim=d) for t, h, d in sorted(combos)])
        log(f"plugin/: {len(combos)} kernel variant(s) x {len(archs)} arch(s) (sm_{', sm_'.join(map(str, archs))})")
    return index


def target(trt, config, ccs) -> None:
    """TensorRT for RTX's builder config: build for exactly the compute capabilities `ccs` (86 for 8.6)."""
    config.num_compute_capabilities = len(ccs)
    for i, cc in enumerate(ccs):
        value = getattr(trt.ComputeCapability, f"SM{cc}", None)
        if value is None or not config.set_compute_capability(value, i):
            raise EngineError(f"{flavour(trt)} {trt.__version__} cannot target compute capability {cc_text(cc)} "
                              f"(its ComputeCapability has {', '.join(trt.ComputeCapability.__members__)})")


def _write_cubins(staging: str, archs, combos: set) -> None:
    """The plugin's cubins for `combos` x `archs` into staging/plugin, named for this process's plugin (a build
    on a GPU may run it)."""
    from ipadapter_instruct.engine.trt.plugin import PLUGIN_DIR_ENV
    from ipadapter_instruct.kernels._runtime import interpreting

    from ipadapter_instruct.export.plugin import write_plugin

    if interpreting():
        raise EngineError("unset TRITON_INTERPRET: the plugin's cubins must be compiled, not interpreted")
    folder = os.path.join(staging, "plugin")
    write_plugin(folder, tuple(archs), log=lambda line: None, combos=combos)
    os.environ[PLUGIN_DIR_ENV] = folder  # (the Python plugin and a C++ library loaded here both read it)


# ----- CLI pieces (wired into `python -m export trt` by export/__main__.py) ----------------------------------

def run(args) -> int:
    prog = "python -m export trt"
    try:
        shapes = {b: parse_shapes(getattr(args, b, None), f"--{b}") for b in BOUNDS}
        graphs = [g for g in (args.graphs or "").split(",") if g] or None
        build_engines(args.dir, args.out, args.fp16, shapes, graphs, args.arch, args.plugin_library, args.tf32,
                      trt=args.trt)
    except EngineError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0
