"""Running the .plan files of `python -m export trt`: `Pipeline.from_pretrained(..., backend="tensorrt",
engines=DIR)` and the CLI's `--backend tensorrt --engines DIR`.

    pipe = TensorRTPipeline.from_engines("out/trt")           # DIR: NAME.plan, engines.json, manifest.json, plugin/
    images = pipe("a red house", image="cond.png", instruct="use the style of this image", scale=0.7)

Requests, guidance branches, scheduler and per-row adapter scales are the engine's own (engine.exported, the same
loop the ONNX Runtime reference runs and tests against the PyTorch path); the five graphs, the UNet step and the
VAE decode among them (and an export's controlnet graphs), run inside TensorRT on torch's current CUDA stream,
with torch tensors as their buffers.
The UNet's adapter attention is the Python plugin (engine/trt/plugin.py), launching the cubins of DIR/plugin.
`enable_cuda_graphs()` replays the UNet step from a CUDA graph per input shape where the execution context says
the stream is capturable.
img2img and inpainting run as on the other runtimes (engine.exported: the same code), with vae_encoder.plan
encoding the photos where the export has that graph (an inpainting export always; else `export onnx --img2img`);
this path has not run on a GPU on this project's machines (the CPU tests run it under ONNX Runtime).

The plans are loaded with the TensorRT that built them (engines.json's `tensorrt`; `trt=` may only confirm it),
and before any plan is read, engines.json's compute capabilities are checked against torch's GPU
(engine.trt.support.refusal): an RTX plan on a Hopper GPU, or a full TensorRT plan on another GPU model than the
one that built it, is one line naming both and what to build instead. Where TensorRT itself refuses the plans (no
GPU, another TensorRT version) the line is built from its own words: `get_engine_validity` on the plan (TensorRT
for RTX has it, the full TensorRT does not), then deserialisation's own error.
"""
from __future__ import annotations

import json
import logging
import os
import threading

import torch

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.exported import GRAPHS, SDXL_GRAPHS, ExportedPipeline, ExportedSDXLPipeline, read_manifest, source_paths
from ipadapter_instruct.engine.pretrained import as_dtype
from ipadapter_instruct.engine.trt import INSTALL, NAMES, RTX_CCS, check_choice, choice_of, flavour, import_tensorrt, load_tensorrt
from ipadapter_instruct.engine.trt.plugin import PLUGIN_DIR_ENV, register_plugin
from ipadapter_instruct.engine.trt.support import cc_list, cc_text, choose_for_plans, refusal, this_gpu

log = logging.getLogger(__name__)
ENGINES_FORMAT = "ipadapter-instruct-trt/1"
_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
          "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8, "INT8": torch.int8}


def read_engines(folder: str) -> dict:
    """engines.json of a `python -m export trt` folder, checked for its format and its plan files."""
    path = os.path.join(folder, "engines.json")
    if not os.path.isdir(folder):
        raise EngineError(f"engine folder not found: {folder}")
    try:
        with open(path) as f:
            index = json.load(f)
    except FileNotFoundError:
        raise EngineError(f"{folder} has no engines.json; build the engines with `python -m export trt ONNX_DIR "
                          f"--out {folder}`") from None
    except (OSError, ValueError) as e:
        raise EngineError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if not isinstance(index, dict) or index.get("format") != ENGINES_FORMAT or not isinstance(index.get("graphs"), dict):
        raise EngineError(f"{path} is not an engines index (format {ENGINES_FORMAT!r} expected)")
    for name, g in index["graphs"].items():
        if not os.path.isfile(os.path.join(folder, g.get("file", ""))):
            raise EngineError(f"{folder}: {name}'s plan {g.get('file')} is missing; rebuild with `python -m export trt`")
    return index


class _Logger:
    """A TensorRT logger that keeps the last errors, so a refusal can quote TensorRT's own words."""

    def __new__(cls, trt):
        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors = []

            def log(self, severity, msg):
                if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                    self.errors = (self.errors + [" ".join(str(msg).split())])[-3:]  # quoted in the refusal
                if severity != trt.ILogger.Severity.VERBOSE:
                    log.debug("TensorRT: %s", msg)

        return Logger()


def cannot_run(trt, runtime, data: bytes, path: str, logger) -> str | None:
    """None when TensorRT says the plan is valid here, else one line: its validity and diagnostics, what torch
    sees, and which GPUs the engines run on."""
    if not hasattr(runtime, "get_engine_validity"):  # the full TensorRT: its deserialiser says why
        return None
    validity, diagnostics = runtime.get_engine_validity(data)
    if validity == trt.EngineValidity.VALID:
        return None
    flags = [d.name for d in trt.EngineInvalidityDiagnostics.__members__.values() if int(diagnostics) & int(d)]
    gpu = this_gpu()
    gpu = f"torch sees {gpu[0]} (compute capability {cc_text(gpu[1])})" if gpu else "torch sees no CUDA GPU"
    where = f"; {flavour(trt)} runs on compute capability {cc_list(RTX_CCS)}" if choice_of(trt) == "rtx" else ""
    said = f"; TensorRT: {logger.errors[-1]}" if logger.errors else ""
    return (f"{flavour(trt)} {trt.__version__} cannot run {path} here: get_engine_validity says "
            f"{validity.name}{' (' + ', '.join(flags) + ')' if flags else ''}; {gpu}{where}{said}")


class TensorRTGraph:
    """One deserialised plan and its execution context, called with torch tensors like the ONNX graphs: one output
    tensor, or a tuple of them in `outputs`' order (the manifest's) for a graph of several (a controlnet's)."""

    def __init__(self, trt, runtime, logger, path: str, device: torch.device, outputs=None):
        with open(path, "rb") as f:
            data = f.read()
        reason = cannot_run(trt, runtime, data, path, logger)
        if reason:
            raise EngineError(reason)
        self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            said = logger.errors[-1] if logger.errors else "no reason given"
            raise EngineError(f"{flavour(trt)} could not deserialise {path}: {said}")
        self.context = self.engine.create_execution_context()
        self._lock = threading.Lock()
        self.trt, self.path, self.device = trt, path, device
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        if outputs is not None:
            if sorted(outputs) != sorted(self.outputs):
                raise EngineError(f"{path} has outputs {', '.join(self.outputs)}; the manifest lists "
                                  f"{', '.join(outputs)}: rebuild it with `python -m export trt`")
            self.outputs = list(outputs)
        self.dtypes = {n: _TORCH[self.engine.get_tensor_dtype(n).name] for n in names}
        self.profile = {n: [tuple(s) for s in self.engine.get_tensor_profile_shape(n, 0)] for n in self.inputs}
        self.graphs = None  # {shapes: (CUDAGraph, static inputs, output)} once CUDA graphs are on

    def _check(self, name: str, shape: tuple) -> None:
        lo, _, hi = self.profile[name]
        if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
            dims = lambda s: "x".join(map(str, s))  # noqa: E731
            raise EngineError(f"{os.path.basename(self.path)}: {name} {dims(shape)} is outside the engine's profile "
                              f"({dims(lo)} to {dims(hi)}); rebuild with `python -m export trt --min/--max`")

    def _bind(self, feeds: dict, own: bool = False) -> tuple[dict, tuple]:
        # own: copy every input into a buffer of our own (a CUDA graph's static inputs), never the caller's tensor
        args = {}
        for n in self.inputs:
            if n not in feeds:
                raise EngineError(f"{os.path.basename(self.path)} needs input {n}")
            t = feeds[n].to(self.device, self.dtypes[n]).contiguous()
            t = t.clone() if own else t
            self._check(n, tuple(t.shape))
            self.context.set_input_shape(n, tuple(t.shape))
            self.context.set_tensor_address(n, t.data_ptr())
            args[n] = t
        outs = tuple(torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=self.dtypes[n], device=self.device)
                     for n in self.outputs)
        for n, o in zip(self.outputs, outs):
            self.context.set_tensor_address(n, o.data_ptr())
        return args, outs

    @staticmethod
    def _result(outs: tuple):
        return outs[0] if len(outs) == 1 else outs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise EngineError(f"{os.path.basename(self.path)}: TensorRT's execute_async_v3 failed (its log says why)")

    def __call__(self, **feeds):
        # one execution context per engine: calls from several threads bind and enqueue in turn (each on its own
        # outputs; a replay returns copies)
        with self._lock:
            if self.graphs is not None:
                return self._replay(feeds)
            args, outs = self._bind(feeds)
            self._execute()
            del args  # the caching allocator keeps them for this stream's queued work
            return self._result(outs)

    def _replay(self, feeds: dict):
        key = tuple((n, tuple(feeds[n].shape)) for n in self.inputs)
        entry = self.graphs.get(key)
        if entry is None:
            args, outs = self._bind(feeds, own=True)
            self._execute()  # TensorRT wants one run at these shapes before a capture
            side = torch.cuda.Stream(self.device)  # capture needs a stream other than the legacy default one
            if not self.context.is_stream_capturable(side.cuda_stream):
                log.warning("%s: TensorRT says its work cannot be captured here; running without CUDA graphs",
                            self.path)
                self.graphs = None
                return self._result(outs)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):  # inside, torch's current stream is `side`
                self._execute()
            self.graphs[key] = entry = (graph, args, outs)
        graph, args, outs = entry
        for n in self.inputs:
            self.context.set_input_shape(n, tuple(args[n].shape))
            self.context.set_tensor_address(n, args[n].data_ptr())
            args[n].copy_(feeds[n].to(self.device, self.dtypes[n]))
        for n, o in zip(self.outputs, outs):
            self.context.set_tensor_address(n, o.data_ptr())
        graph.replay()
        return self._result(tuple(o.clone() for o in outs))


class TensorRTPipeline(ExportedPipeline):
    """engine.Pipeline whose five graphs are the TensorRT engines of an `python -m export trt` folder."""

    runtime = "tensorrt"
    RUNTIME = "tensorrt"

    @classmethod
    def open_engines(cls, model, image_encoder, adapter, device, dtype, engines, trt) -> "TensorRTPipeline":
        """`Pipeline.from_pretrained(..., backend="tensorrt", engines=DIR)`: the folder checked against what the
        caller asked for (kind, dtype, adapter), then opened."""
        if engines is None:
            raise EngineError("backend tensorrt needs the engine folder (engines=, --engines DIR): what "
                              "`python -m export trt --out DIR` wrote")
        manifest = read_manifest(engines)
        if manifest.get("kind") == "edit":
            raise EngineError(f"the engines in {engines} are an InstructPix2Pix export: editing runs on the PyTorch "
                              "backend (EditPipeline) or ONNX Runtime (export.onnx_runtime.OnnxEditPipeline); a TensorRT "
                              "edit runtime is not built yet")
        if dtype is not None and as_dtype(dtype) != getattr(torch, manifest["dtype"]):
            name = str(as_dtype(dtype)).removeprefix("torch.")  # a name or a torch dtype (torch_dtype=) alike
            raise EngineError(f"the engines in {engines} are {manifest['dtype']}; dtype {name} needs engines built "
                              f"from a `python -m export onnx --dtype {name}` export")
        if adapter is not None:  # the adapter is inside unet.plan: only the one it was built with can be meant
            built = source_paths(manifest, engines, ("adapter",))["adapter"]
            if os.path.realpath(adapter) != os.path.realpath(built):
                raise EngineError(f"the engines in {engines} were built with the adapter {built}, not {adapter}: "
                                  "export and build again for another adapter")
        return cls.from_engines(engines, model, image_encoder, device, trt=trt)

    @classmethod
    def from_engines(cls, folder: str, model: str | None = None, image_encoder: str | None = None,
                     device=None, trt: str = "auto") -> "TensorRTPipeline":
        """folder: DIR of `python -m export trt --out DIR`; model / image_encoder: where the tokenizer, scheduler and
        image processor are, in place of the manifest's sources; device: a CUDA device (default cuda); trt: auto
        (the TensorRT engines.json names), or full / rtx, which must be that one."""
        manifest = read_manifest(folder)
        index = read_engines(folder)
        choice = choose_for_plans(index, folder, check_choice(trt))
        sdxl = manifest.get("kind") == "sdxl"
        if sdxl and cls is TensorRTPipeline:
            cls = TensorRTSDXLPipeline
        names = plan_names(manifest, index, folder)
        device = torch.device(device or "cuda")
        if device.type != "cuda":
            raise EngineError(f"TensorRT engines run on a CUDA device, not {device}")
        reason = refusal(index, folder, this_gpu(device))  # before any plan is read
        if reason:
            raise EngineError(reason)
        trt = _load(choice, index, folder)
        logger = _Logger(trt)
        runtime = trt.Runtime(logger)
        if index.get("plugin_dir"):
            os.environ.setdefault(PLUGIN_DIR_ENV, os.path.abspath(os.path.join(folder, index["plugin_dir"])))
            if index.get("plugin_library"):  # the C++ plugin travels inside the plans: let TensorRT load it
                runtime.engine_host_code_allowed = True
            else:
                register_plugin(trt)
        graphs = {}
        for name in names:  # (the ControlNets' graphs return their residuals in the manifest's order)
            outputs = [t["name"] for t in manifest["graphs"].get(name, {}).get("outputs") or []] or None
            graphs[name] = TensorRTGraph(trt, runtime, logger, os.path.join(folder, index["graphs"][name]["file"]),
                                         device, outputs)
        pipe = cls(folder, graphs, device, model, image_encoder, manifest)
        pipe.engines, pipe.runtime = index, runtime
        return pipe

    def enable_cuda_graphs(self, enabled: bool = True) -> None:
        """Replay the UNet engine from a CUDA graph per input shape (captured on first use at that shape)."""
        self.graphs["unet"].graphs = {} if enabled else None


def plan_names(manifest: dict, index: dict, folder: str) -> list[str]:
    """The plans a pipeline opens: its kind's graphs and ControlNets', and vae_encoder where it was built (starting
    from a photo: img2img, inpainting); one line naming a missing one (vae_encoder too for a 9-channel inpainting
    UNet, which cannot run without it)."""
    sdxl = manifest.get("kind") == "sdxl"
    names = [*(SDXL_GRAPHS if sdxl else GRAPHS), *(c["graph"] for c in manifest.get("controlnets") or [])]
    latent = manifest["graphs"]["vae_decoder"]["inputs"][0]["shape"][1]
    if "vae_encoder" in index["graphs"] or manifest["graphs"]["unet"]["inputs"][0]["shape"][1] == 2 * latent + 1:
        names.append("vae_encoder")
    missing = [g for g in names if g not in index["graphs"]]
    if missing:
        raise EngineError(f"{folder} has no plan for {', '.join(missing)}: build every graph of the export "
                          "with `python -m export trt`")
    return names


def _load(choice: str, index: dict, folder: str):
    """The TensorRT module for plans built by `choice`, or one line naming their builder and its install."""
    module, why = import_tensorrt(choice) if choice != "auto" else (load_tensorrt(), None)
    if module is None:
        other = "rtx" if choice == "full" else "full"
        t = index["tensorrt"]
        raise EngineError(f"the plans in {folder} were built by {t.get('name')} {t.get('version')} (engines.json), "
                          f"which does not import here ({why}): {INSTALL[choice]}; or rebuild them with "
                          f"{NAMES[other]} (`python -m export trt ONNX_DIR --out {folder} --trt {other}`)")
    return module


class TensorRTSDXLPipeline(ExportedSDXLPipeline, TensorRTPipeline):
    """engine.sdxl.SDXLPipeline's maths around the six TensorRT engines of an SDXL export (text_encoder_2 beside
    the five); `TensorRTPipeline.from_engines` returns one for an SDXL folder."""
