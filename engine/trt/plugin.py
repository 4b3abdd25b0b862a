"""The adapter attention as a TensorRT plugin written in Python: ipadapter_instruct::DecoupledAttention, version 1.

    out (B, Lq, H*D) = per head  softmax(q k^T / sqrt(D)) v  +  ip_scale[b] * softmax(q k_ip^T / sqrt(D)) v_ip

An IPluginV3 (OneCore + OneBuild + OneRuntime) with an IPluginCreatorV3One creator: the one plugin interface both
TensorRT and TensorRT for RTX import from an ONNX graph (TensorRT for RTX refuses the IPluginV3Quick* classes, and
its network API has no add-plugin call: the ONNX parser is the way in). The parser maps the graph's node, op type
DecoupledAttention with a `plugin_namespace` attribute (export/graph_attention.py), to the creator registered
under that name and namespace, and passes the node's other attributes as fields: num_heads (required) and aot
(ignored; it named the earlier tensorrt.plugin form).

Inputs q (B, Lq, W), k, v (B, Lt, W), k_ip, v_ip (B, Li, W), all float32 or all float16, linear; ip_scale (B,)
float32, a run-time input (one adapter strength per batch row, never a build-time constant). Output: q's shape
and type. `enqueue` launches the project's ahead-of-time cubin for the GPU it runs on (kernels/launch.py, CUDA
driver API through CuPy) on TensorRT's stream; the cubins are a `python -m export plugin` folder, which
`python -m export trt` writes beside the engines (ENGINES/plugin), named by the environment variable
IPADAPTER_INSTRUCT_PLUGIN_DIR. export/cpp/plugin.cpp is the same plugin in C++ (same name, fields and launch)
for engines that run without Python.

The decisions (types, shapes, formats, fields) are plain functions below, tested without a GPU; the classes
only wrap them for whichever TensorRT module `engine.trt.load_tensorrt` returns.
"""
from __future__ import annotations

import functools
import os

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.trt import load_tensorrt

NAME, VERSION, NAMESPACE = "DecoupledAttention", "1", "ipadapter_instruct"
INPUTS = ("q", "k", "v", "k_ip", "v_ip", "ip_scale")
SCALE = INPUTS.index("ip_scale")
PLUGIN_DIR_ENV = "IPADAPTER_INSTRUCT_PLUGIN_DIR"
FIELDS = ("num_heads", "aot")  # what the creator takes; only num_heads is serialised


# ----- the decisions, as plain values ------------------------------------------------------------------------

def output_type(input_types: list) -> list:
    """The output's type: q's."""
    return [input_types[0]]


def supports(pos: int, types: list, linear: list, float32, float16) -> bool:
    """Whether TensorRT may give position `pos` (inputs 0-5, then the output) the type types[pos], with the types
    before it already chosen: q float32 or float16, k..v_ip and the output the same as q, ip_scale float32; every
    tensor linear."""
    if not linear[pos]:
        return False
    if pos == SCALE:
        return types[pos] == float32
    if pos == 0:
        return types[0] in (float32, float16)
    return types[pos] == types[0]


def check_shapes(dims: list[tuple], heads: int) -> None:
    """EngineError (one line) unless dims (q, k, v, k_ip, v_ip, ip_scale; -1 = not known yet) fit each other."""
    if len(dims) != len(INPUTS):
        raise EngineError(f"{NAME} takes {len(INPUTS)} inputs ({', '.join(INPUTS)}), got {len(dims)}")
    for name, d in zip(INPUTS, dims):
        if len(d) != (1 if name == "ip_scale" else 3):
            raise EngineError(f"{NAME}: {name} must be {'(B,)' if name == 'ip_scale' else '(B, L, H*D)'}, "
                              f"got rank {len(d)}")
    width = dims[0][2]
    if width > 0 and width % heads:
        raise EngineError(f"{NAME}: q's width {width} is not a multiple of num_heads={heads}")
    for name, d in zip(INPUTS, dims):
        if width > 0 and name != "ip_scale" and d[2] > 0 and d[2] != width:
            raise EngineError(f"{NAME}: {name} is {d[2]} wide, q is {width}")
        if dims[0][0] > 0 and d[0] > 0 and d[0] != dims[0][0]:
            raise EngineError(f"{NAME}: {name} has batch {d[0]}, q has {dims[0][0]}")
    for a, b in ((1, 2), (3, 4)):
        if dims[a][1] > 0 and dims[b][1] > 0 and dims[a][1] != dims[b][1]:
            raise EngineError(f"{NAME}: {INPUTS[a]} and {INPUTS[b]} differ in length ({dims[a][1]} vs {dims[b][1]})")


def read_fields(fields: dict) -> int:
    """num_heads from the creator's fields ({name: sequence of ints}); EngineError names a missing or bad one."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise EngineError(f"{NAME} has no field {', '.join(unknown)}; it takes {', '.join(FIELDS)}")
    heads = list(fields.get("num_heads", ()))
    if len(heads) != 1 or int(heads[0]) < 1:
        raise EngineError(f"{NAME} needs one positive num_heads field, got {heads or 'none'}")
    return int(heads[0])


def launch_sizes(q: tuple, k: tuple, k_ip: tuple) -> tuple:
    """(B, Lq, Lt, Li) for kernels.launch.launch_pointers from the run-time shapes of q, k and k_ip."""
    return int(q[0]), int(q[1]), int(k[1]), int(k_ip[1])


def plugin_dir() -> str:
    folder = os.environ.get(PLUGIN_DIR_ENV)
    if not folder:
        raise EngineError(f"{NAME}: set {PLUGIN_DIR_ENV} to the plugin's cubin folder (ENGINES/plugin, written by "
                          "`python -m export trt`, or a `python -m export plugin` folder)")
    return folder


@functools.cache
def _arch(device: int) -> str:
    import cupy

    return "sm_" + cupy.cuda.Device(device).compute_capability


# ----- the TensorRT classes ------------------------------------------------------------------------------------

@functools.cache
def plugin_classes(trt):
    """(Plugin, Creator) for the TensorRT module `trt`."""
    import numpy as np

    class DecoupledAttentionPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild,
                                   trt.IPluginV3OneRuntime):
        def __init__(self, heads: int, phase=None):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name, self.plugin_version, self.plugin_namespace = NAME, VERSION, NAMESPACE
            self.num_outputs = 1
            self.heads, self.phase = heads, phase
            self.timing_cache_id = ""  # one kernel whatever the layer: nothing to time per instance

        def get_capability_interface(self, type):
            return self

        def get_output_data_types(self, input_types):
            return output_type(input_types)

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            return [trt.DimsExprs(inputs[0])]

        def supports_format_combination(self, pos, in_out, num_inputs):
            descs = [d.desc for d in in_out]
            return supports(pos, [d.type for d in descs], [d.format == trt.TensorFormat.LINEAR for d in descs],
                            trt.DataType.FLOAT, trt.DataType.HALF)

        def configure_plugin(self, inputs, outputs):
            check_shapes([tuple(d.desc.dims) for d in inputs], self.heads)

        def on_shape_change(self, inputs, outputs):
            check_shapes([tuple(d.dims) for d in inputs], self.heads)

        def get_fields_to_serialize(self):
            return trt.PluginFieldCollection([trt.PluginField("num_heads", np.array([self.heads], dtype=np.int32),
                                                              trt.PluginFieldType.INT32)])

        def get_workspace_size(self, inputs, outputs):
            return 0

        def set_tactic(self, tactic):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def clone(self):
            return DecoupledAttentionPlugin(self.heads, self.phase)

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            import cupy

            from ipadapter_instruct.kernels.launch import launch_pointers

            b, lq, lt, li = launch_sizes(tuple(input_desc[0].dims), tuple(input_desc[1].dims),
                                         tuple(input_desc[3].dims))
            if b * lq == 0:
                return
            dtype = "float16" if input_desc[0].type == trt.DataType.HALF else "float32"
            device = cupy.cuda.runtime.getDevice()
            arch = _arch(device)
            pointers = dict(zip(("Q", "K", "V", "KI", "VI", "Scale"), (int(p) for p in inputs)), Out=int(outputs[0]))
            launch_pointers(plugin_dir(), pointers, dtype, self.heads, int(input_desc[0].dims[2]), (b, lq, lt, li),
                            arch, int(stream), device)

    class DecoupledAttentionCreator(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_version, self.plugin_namespace = NAME, VERSION, NAMESPACE
            self.field_names = trt.PluginFieldCollection(
                [trt.PluginField(f, np.array([], dtype=np.int32), trt.PluginFieldType.INT32) for f in FIELDS])

        def create_plugin(self, name, fc, phase):
            return DecoupledAttentionPlugin(read_fields({f.name: np.asarray(f.data).reshape(-1) for f in fc}), phase)

    return DecoupledAttentionPlugin, DecoupledAttentionCreator


_registered = {}


def register_plugin(trt=None):
    """Register the Python creator with `trt`'s plugin registry (once per module); returns the creator."""
    trt = trt or load_tensorrt()
    if trt.__name__ not in _registered:
        creator = plugin_classes(trt)[1]()
        if not trt.get_plugin_registry().register_creator(creator, NAMESPACE):
            raise EngineError(f"TensorRT refused to register {NAMESPACE}::{NAME} (is another creator, e.g. the C++ "
                              "plugin library, already registered under that name?)")
        _registered[trt.__name__] = creator  # kept alive: the registry holds only a pointer
    return _registered[trt.__name__]
