"""export/cpp/plugin.cpp (the DecoupledAttention plugin as a C++ library) and unet_bench.cpp (a C++ UNet engine
timer), compiled against the open-source TensorRT 11.1 headers named by $TRT_INCLUDE_DIR.

Without a GPU: the library loads with no CUDA driver, TensorRT builds the tiny UNet from its plugin-form ONNX export
with it (fp32 and fp16, one plugin layer per cross-attention), it refuses bad graphs with its own message, and
unet_bench links. On a GPU: unet_bench runs the engine with the plugin's cubins and prints ms/step.
"""
import ctypes
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import gpu
from test_export_launch import CPP, CXX, cuda_include
from test_export_plugin import ROOT, export

HEADERS = os.environ.get("TRT_INCLUDE_DIR", "")
NO_HEADERS = ("TRT_INCLUDE_DIR is not set: the C++ plugin compiles against the open-source TensorRT 11.1 headers "
              "(NVIDIA/TensorRT release/11.1 include/), which no package registry ships")
LIB = "libipadapter_instruct_plugin.so"

# Builds one engine in a child process (TensorRT aborts the whole process on some loader failures) and prints a
# JSON summary last. argv: plugin library, ONNX file, plan, profiles {input: [min, opt, max]} as JSON.
BUILD = r"""
import json, os, sys
try:
    import tensorrt_rtx_bindings as trt
    libs = os.path.dirname(__import__("tensorrt_rtx_libs").__file__)
    # the RTX parser dlopens the unversioned libtensorrt_rtx.so for plugin nodes, which the wheel does not ship
    if not os.path.exists(os.path.join(libs, "libtensorrt_rtx.so")):
        os.symlink("libtensorrt_rtx.so.1", os.path.join(libs, "libtensorrt_rtx.so"))
except ImportError:
    import tensorrt as trt
lib, onnx_path, plan, profiles = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])

class Log(trt.ILogger):
    def __init__(self):
        super().__init__()
        self.lines = []
    def log(self, severity, msg):
        self.lines.append(msg)

log = Log()
builder = trt.Builder(log)
assert trt.get_plugin_registry().load_library(lib), "load_library failed"
network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
parser = trt.OnnxParser(network, log)
assert parser.parse_from_file(onnx_path), [str(parser.get_error(i)) for i in range(parser.num_errors)]
config = builder.create_builder_config()
config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the builder then logs every engine layer
config.plugins_to_serialize = [lib]
if profiles:
    profile = builder.create_optimization_profile()
    for name, shapes in profiles.items():
        profile.set_shape(name, *shapes)
    config.add_optimization_profile(profile)
data = builder.build_serialized_network(network, config)
if data is not None:
    with open(plan, "wb") as f:
        f.write(data)
layers = [network.get_layer(i) for i in range(network.num_layers)]
listing = [m for m in "\n".join(log.lines).splitlines() if m.startswith("Name: ") and ", LayerType: " in m]
print(json.dumps(dict(
    built=data is not None,
    plugin_layers=sum(l.type == trt.LayerType.PLUGIN_V3 for l in layers),
    engine_layers=len(listing),
    engine_plugin_layers=sum("DecoupledAttention" in m and "LayerType: custom_layer" in m for m in listing),
    create=[m for m in log.lines if "DecoupledAttention: createPlugin(" in m],
    plugin_errors=[m for m in log.lines if m.startswith("ipadapter_instruct::DecoupledAttention: ")
                   and "createPlugin(" not in m and "loaded " not in m],
    embedded=any("Adding plugin library" in m for m in log.lines))))
"""


def make(build, *targets):
    return subprocess.run(["make", "-C", CPP, f"BUILD={build}", f"TRT_INCLUDE_DIR={HEADERS}",
                           f"CUDA_INCLUDE={cuda_include()}", f"CXX={CXX}", f"PYTHON={sys.executable}", *targets],
                          capture_output=True, text=True, timeout=300)


def dry_make(*args):
    """`make -n`: the commands make would run, without headers, a compiler run or a TensorRT library."""
    return subprocess.run(["make", "-n", "-C", CPP, "BUILD=/nonexistent/build", "TRT_INCLUDE_DIR=/nonexistent",
                           f"PYTHON={sys.executable}", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_makefile_links_unet_bench_with_the_tensorrt_TRT_names():
    import importlib.util

    rtx = dry_make("unet_bench")
    assert rtx.returncode == 0, rtx.stderr
    compile_line, link = [line for line in rtx.stdout.splitlines() if "unet_bench" in line and "g++" in line][-2:]
    assert "-DUNET_BENCH_TRT_FULL" not in compile_line
    if importlib.util.find_spec("tensorrt_rtx_libs"):  # the wheel's library, with an rpath to its folder
        assert "tensorrt_rtx_libs/libtensorrt_rtx.so.1 -Wl,-rpath," in link, link
    else:
        assert "-ltensorrt_rtx" in link, link
    full = dry_make("unet_bench", "TRT=full")
    compile_line, link = [line for line in full.stdout.splitlines() if "unet_bench" in line and "g++" in line][-2:]
    assert "-DUNET_BENCH_TRT_FULL=1" in compile_line
    assert ("tensorrt_libs/libnvinfer.so." if importlib.util.find_spec("tensorrt_libs") else "-lnvinfer") in link
    own = dry_make("unet_bench", "TRT=full", "TRT_LIB=/opt/trt/lib/libnvinfer.so.10")
    assert "/opt/trt/lib/libnvinfer.so.10 -Wl,-rpath,/opt/trt/lib/ -ldl" in own.stdout, own.stdout
    bad = dry_make("unet_bench", "TRT=fast")
    assert bad.returncode == 2 and "TRT=fast: choose TRT=rtx (TensorRT for RTX, the default) or TRT=full" in bad.stderr


@pytest.fixture(scope="module")
def cpp(tmp_path_factory):
    """The build folder with the plugin library; skips where the headers, TensorRT or a compiler are missing."""
    if not HEADERS:
        pytest.skip(NO_HEADERS)
    if not os.path.exists(os.path.join(HEADERS, "NvInferRuntime.h")):
        pytest.skip(f"TRT_INCLUDE_DIR={HEADERS} has no NvInferRuntime.h")
    if shutil.which(CXX) is None or shutil.which("make") is None or cuda_include() is None:
        pytest.skip(f"needs a C++ compiler ({CXX}), make and cuda_runtime_api.h")
    try:
        import tensorrt_rtx_bindings  # noqa: F401
    except ImportError:
        try:
            import tensorrt  # noqa: F401
        except Exception as e:
            pytest.skip(f"neither tensorrt_rtx_bindings nor tensorrt imports ({type(e).__name__}: {e})")
    build = tmp_path_factory.mktemp("cpp")
    res = make(build, "plugin")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "warning:" not in res.stderr, res.stderr[-3000:]
    return build


@pytest.fixture(scope="module")
def kernels_dir(tiny, tmp_path_factory):
    """On a GPU: the plugin's cubins for this GPU and the tiny UNet's head sizes (IPADAPTER_INSTRUCT_PLUGIN_DIR)."""
    import torch

    if not torch.cuda.is_available():
        return None
    with open(os.path.join(tiny["model"], "unet", "config.json")) as f:
        cfg = json.load(f)
    heads = cfg["attention_head_dim"]  # diffusers' name for the head count of SD1.5-style UNets
    dims = sorted({c // heads for c in cfg["block_out_channels"]})
    major, minor = torch.cuda.get_device_capability()
    out = tmp_path_factory.mktemp("kernels")
    code = (f"from ipadapter_instruct.export.plugin import write_plugin; write_plugin({str(out)!r}, ({major * 10 + minor},), "
            f"('float32', 'float16'), {tuple(dims)!r}, {heads})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def build_engine(cpp, onnx_path, plan, profiles, kernels=None):
    env = dict(os.environ, **({"IPADAPTER_INSTRUCT_PLUGIN_DIR": str(kernels)} if kernels else {}))
    res = subprocess.run([sys.executable, "-c", BUILD, str(cpp / LIB), str(onnx_path), str(plan), json.dumps(profiles)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"exit {res.returncode}: {res.stderr[-3000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=["float32", "float16"])
def engine(request, cpp, tiny, kernels_dir, tmp_path_factory):
    """(plan, build summary, manifest) of the tiny UNet, plugin form, built with the C++ library."""
    out = tmp_path_factory.mktemp("onnx") / request.param
    res = export("onnx", "--model", tiny["model"], "--image-encoder", tiny["image_encoder"], "--adapter",
                 tiny["adapter"], "--out", str(out), "--dtype", request.param, "--graphs", "unet")
    assert res.returncode == 0, res.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    g = manifest["graphs"]["unet"]
    profiles = {i["name"]: [g["profiles"][b][i["name"]] for b in ("min", "opt", "max")] for i in g["inputs"]}
    plan = out / "unet.plan"
    return plan, build_engine(cpp, out / g["file"], plan, profiles, kernels_dir), manifest


def test_library_loads_without_a_cuda_driver_and_exports_the_loader_entry_points(cpp):
    lib = ctypes.CDLL(str(cpp / LIB))  # libcuda is opened at the first enqueue, not at load
    lib.getCreators.restype = ctypes.c_void_p
    count = ctypes.c_int32(0)
    assert lib.getCreators(ctypes.byref(count)) and count.value == 1
    assert lib.setLoggerFinder


def test_unet_engine_builds_with_one_plugin_layer_per_cross_attention(engine):
    plan, summary, manifest = engine
    nodes = manifest["graphs"]["unet"]["plugin_nodes"]
    assert summary["built"] and plan.stat().st_size > 0
    assert summary["plugin_layers"] == nodes > 0
    # TensorRT-RTX lists the engine's layers at DETAILED verbosity: the plugin layers survive as custom layers
    if summary["engine_layers"]:
        assert summary["engine_plugin_layers"] == nodes, summary
    # what TensorRT's ONNX parser hands the creator: the node's integer attributes as INT32 (type 5) fields
    assert len(summary["create"]) == nodes
    assert all(m.endswith("fields: num_heads (type 5, length 1), aot (type 5, length 1)") for m in summary["create"])
    assert summary["embedded"] and not summary["plugin_errors"]


def attention_graph(path, heads=8, dtypes=("float",) * 5 + ("float",)):
    import onnx
    from onnx import helper

    types = {"float": onnx.TensorProto.FLOAT, "half": onnx.TensorProto.FLOAT16}
    shapes = dict(q=[2, 5, 32], k=[2, 7, 32], v=[2, 7, 32], k_ip=[2, 3, 32], v_ip=[2, 3, 32], ip_scale=[2])
    inputs = [helper.make_tensor_value_info(n, types[t], s) for (n, s), t in zip(shapes.items(), dtypes)]
    node = helper.make_node("DecoupledAttention", list(shapes), ["out"], domain="ai.onnx.contrib",
                            plugin_namespace="ipadapter_instruct", num_heads=heads, aot=1)
    out = helper.make_tensor_value_info("out", types[dtypes[0]], shapes["q"])
    model = helper.make_model(helper.make_graph([node], "attention", inputs, [out]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.contrib", 1)])
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("heads, dtypes, message", [
    (3, ("float",) * 6, "width 32 is not a multiple of num_heads=3"),
    (8, ("half", "float", "half", "half", "half", "float"), None),  # k is not q's type
    (8, ("half",) * 6, None),  # ip_scale must stay float32
])
def test_plugin_refuses_bad_graphs(cpp, tmp_path, heads, dtypes, message):
    onnx_path = attention_graph(tmp_path / "attention.onnx", heads, dtypes)
    summary = build_engine(cpp, onnx_path, tmp_path / "attention.plan", {})
    assert not summary["built"] and not (tmp_path / "attention.plan").exists()
    if message:
        assert any(message in m for m in summary["plugin_errors"]), summary["plugin_errors"]


def test_plugin_builds_a_lone_attention_node(cpp, tmp_path):
    summary = build_engine(cpp, attention_graph(tmp_path / "a.onnx"), tmp_path / "a.plan", {})
    assert summary["built"] and summary["plugin_layers"] == 1 and not summary["plugin_errors"]


@pytest.fixture(scope="module")
def unet_bench(cpp):
    res = make(cpp, "unet_bench")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "warning:" not in res.stderr, res.stderr[-3000:]
    return cpp / "unet_bench"


def test_unet_bench_compiles_for_the_full_tensorrt(cpp, tmp_path):
    """TRT=full compiles the version check against the headers' major version in (no libnvinfer here to link);
    switching TRT rebuilds the object."""
    res = make(tmp_path, "TRT=full", "unet_bench.o")
    assert res.returncode == 0 and "warning:" not in res.stderr, res.stderr[-3000:]
    assert b"running libnvinfer " in (tmp_path / "unet_bench.o").read_bytes()
    res = make(tmp_path, "TRT=rtx", "unet_bench.o")
    assert res.returncode == 0 and "unet_bench.cpp" in res.stdout, res.stdout
    assert b"running libnvinfer " not in (tmp_path / "unet_bench.o").read_bytes()


def test_unet_bench_links_and_answers_bad_arguments_in_one_line(unet_bench):
    assert os.access(unet_bench, os.X_OK)
    res = subprocess.run([str(unet_bench), "--steps", "0", "x.plan"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and res.stderr == "unet_bench: --steps wants a positive integer, got 0\n"


@gpu
def test_unet_bench_times_the_engine(unet_bench, engine, kernels_dir, cpp):
    plan, _, manifest = engine
    opt = manifest["graphs"]["unet"]["profiles"]["opt"]["sample"]
    res = subprocess.run([str(unet_bench), str(plan), "--plugin", str(cpp / LIB), "--batch", str(opt[0]),
                          "--latent-height", str(opt[2]), "--latent-width", str(opt[3]), "--warmup", "2",
                          "--steps", "5"], env=dict(os.environ, IPADAPTER_INSTRUCT_PLUGIN_DIR=str(kernels_dir)),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert " ms/step " in res.stdout, res.stdout


def test_export_trt_builds_every_graph_with_the_library_embedded(cpp, tiny, tmp_path):
    """`python -m export trt --plugin-library`: the plugin nodes import through the C++ creator (the Python one is
    not registered in that process), every plan builds, the UNet's engine lists the plugin layers, and the
    library travels inside unet.plan."""
    onnx_dir, plans = tmp_path / "onnx", tmp_path / "plans"
    res = export("onnx", "--model", tiny["model"], "--image-encoder", tiny["image_encoder"], "--adapter",
                 tiny["adapter"], "--out", str(onnx_dir), "--device", "cpu")
    assert res.returncode == 0, res.stderr[-2000:]
    res = export("trt", str(onnx_dir), "--out", str(plans), "--arch", "86", "--trt", "rtx", "--plugin-library",
                 str(cpp / LIB))
    assert res.returncode == 0, res.stderr[-3000:]
    index = json.loads((plans / "engines.json").read_text())
    assert index["plugin_library"] == LIB and index["plugin_dir"] == "plugin"
    assert index["graphs"]["unet"]["engine"]["plugin_layers"] == index["graphs"]["unet"]["plugin_layers"] == 4
    assert LIB.encode() in (plans / "unet.plan").read_bytes() or \
        (cpp / LIB).read_bytes()[:4096] in (plans / "unet.plan").read_bytes()
