"""`python -m export trt` where TensorRT cannot be installed: the one-line reason it stops with, the checks made
before that (manifest, trtexec shape syntax, profiles), the plugin's launch numbers (compiled with Triton for a GPU
arch, no GPU needed), the plugin definition against a stand-in for `tensorrt.plugin` (not TensorRT itself), and
`--backend tensorrt` / `--providers tensorrt` in the engine and the bench."""
import argparse
import inspect
import json
import os
import subprocess
import sys
import textwrap
import types

import pytest

from engine.errors import EngineError
from export import trt
from export.onnx import FORMAT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REASON = trt.tensorrt_unavailable()
no_tensorrt = pytest.mark.skipif(REASON is None, reason="TensorRT is installed here")


def cli_args(*argv):
    p = argparse.ArgumentParser()
    trt.add_arguments(p)
    return p.parse_args([str(a) for a in argv])


def io(name, shape):
    return {"name": name, "dtype": "float32", "shape": shape, "meaning": name}


@pytest.fixture
def export_dir(tmp_path):
    unet = {"file": "unet.onnx", "inputs": [io("sample", ["batch", 4, "height", "width"]), io("timestep", [1]),
                                            io("ip_scale", ["batch"])],
            "outputs": [io("noise", ["batch", 4, "height", "width"])],
            "profiles": {"min": {"sample": [1, 4, 8, 8], "ip_scale": [1]},
                         "opt": {"sample": [2, 4, 64, 64], "ip_scale": [2]},
                         "max": {"sample": [8, 4, 96, 96], "ip_scale": [8]}}}
    manifest = {"format": FORMAT, "opset": 17, "dtype": "float32", "attention": "plugin", "plugin": trt.PLUGIN,
                "graphs": {"unet": unet}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


@no_tensorrt
def test_reason_is_one_line_and_names_the_stubs():
    assert "\n" not in REASON and "stubs" in REASON and "TensorRT 10.x" in REASON
    assert trt.tensorrt_runtime_unavailable() == REASON


def test_run_needs_a_manifest(tmp_path, capsys):
    assert trt.run(cli_args(tmp_path)) == 2
    assert "has no manifest.json" in one_line(capsys)


@no_tensorrt
def test_run_stops_at_tensorrt_with_the_reason(export_dir, capsys):
    assert trt.run(cli_args(export_dir, "--opt", "sample:2x4x32x32,ip_scale:2", "--fp16")) == 2
    assert one_line(capsys) == f"python -m export trt: {REASON}"
    assert sorted(os.listdir(export_dir)) == ["manifest.json"]
    with pytest.raises(EngineError, match="stubs"):
        trt.build_engines(str(export_dir))


@pytest.mark.parametrize("flag, value, message", [
    ("--min", "sample=1x4x8x8", "bad --min shape 'sample=1x4x8x8'"),
    ("--max", "sample:8x4x0x96", "bad --max shape 'sample:8x4x0x96'"),
    ("--opt", "sample:2x4xlarge", "bad --opt shape 'sample:2x4xlarge'"),
    ("--opt", "sample:2x4x64x64,sample:1x4x8x8", "--opt gives sample twice"),
    ("--opt", "sample:2x4x64", "opt shape 2x4x64 for input sample does not fit"),
    ("--opt", "sample:2x3x64x64", "opt shape 2x3x64x64 for input sample does not fit"),
    ("--min", "latent:1x4x8x8", "no graph has an input named latent"),
    ("--min", "sample:4x4x8x8", "needs min <= opt <= max"),
])
def test_bad_shapes_are_refused_before_tensorrt(export_dir, capsys, flag, value, message):
    assert trt.run(cli_args(export_dir, flag, value)) == 2
    err = one_line(capsys)
    assert err.startswith("python -m export trt: error: ") and message in err, err


def test_shapes_in_trtexec_syntax_override_the_manifest(export_dir):
    shapes = trt.parse_shapes(["sample:2x4x32x32,ip_scale:2", " timestep:1 "], "--opt")
    assert shapes == {"sample": (2, 4, 32, 32), "ip_scale": (2,), "timestep": (1,)}
    assert trt.parse_shapes(["onnx::Mul_1:3x5"], "--min") == {"onnx::Mul_1": (3, 5)}  # names may hold colons
    profiles = trt.graph_profiles(trt.read_manifest(str(export_dir)), {"opt": shapes})
    assert profiles["unet"]["sample"] == ((1, 4, 8, 8), (2, 4, 32, 32), (8, 4, 96, 96))
    assert profiles["unet"]["timestep"] == ((1,), (1,), (1,))  # fixed shape: no profile entry needed


def test_manifest_is_checked(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(EngineError, match="not an export manifest"):
        trt.read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(EngineError, match="cannot read"):
        trt.read_manifest(str(tmp_path))


def test_precision_follows_the_export():
    assert trt.precision("float32", False, True) == "strong"
    assert trt.precision("float16", True, False) == "strong"  # a float16 export is half already
    assert trt.precision("float32", True, True) == "weak"
    with pytest.raises(EngineError, match="--dtype float16"):
        trt.precision("float32", True, False)  # TensorRT 11: no BuilderFlag.FP16


def test_plan_is_written_whole_or_not_at_all(tmp_path):
    trt.write_atomic(str(tmp_path / "unet.plan"), b"engine")
    assert (tmp_path / "unet.plan").read_bytes() == b"engine"
    with pytest.raises(TypeError):
        trt.write_atomic(str(tmp_path / "vae.plan"), object())
    assert sorted(os.listdir(tmp_path)) == ["unet.plan"]


def test_launch_rules_without_compiling():
    assert trt.grid(3, 1000, 64, 8, lambda a, m: -(-a // m)) == (16, 24, 1)
    assert trt.extra_args((2, 4096, 320), (2, 77, 320), (2, 16, 320)) == (4096, 77, 16)
    assert trt.head_dim(1280, 8) == 160 and trt.plugin_dtype("HALF") == "float16"
    with pytest.raises(EngineError, match="not a multiple of num_heads=8"):
        trt.head_dim(321, 8)
    with pytest.raises(EngineError, match="FLOAT or HALF"):
        trt.plugin_dtype("BF16")
    assert trt.autotune_types().split(",") == ["FP32|FP16"] * 5 + ["FP32", "FP32|FP16"]


def test_unused_trailing_parameters_are_trimmed():
    ptx = ".entry k(\n\t.param .u64 k_param_0,\n\t.param .u32 k_param_1,\n\t.param .u64 k_param_2\n)\n{\n" \
          "\tld.param.u64 %rd1, [k_param_0];\n\tld.param.u32 %r1, [k_param_1];\n}\n"
    trimmed = trt.trim_scratch(ptx, "k", 2)
    assert "k_param_2" not in trimmed and trimmed.endswith(ptx[ptx.index(")"):])
    with pytest.raises(EngineError, match="reads its extra parameter k_param_1"):
        trt.trim_scratch(ptx, "k", 1)


def test_aot_launch_refuses_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(EngineError, match="unset TRITON_INTERPRET"):
        trt.aot_launch("float16", 8, 320, 80)


def test_aot_launch_matches_the_plugin_variant():
    """Compiled with Triton for sm_80 and sm_90 (TRITON_INTERPRET unset, so in a subprocess): the launch numbers
    are export/plugin.py's variant's, and the PTX keeps exactly the parameters TensorRT passes and assembles."""
    script = textwrap.dedent("""
        from export.plugin import ptx_params
        from kernels.aot import packed_variant
        from export.trt import KERNEL_ARGS, aot_launch, launch_numbers
        from kernels.aot import compile_kernel, ptxas_usage

        for dtype, d, arch in (("float16", 40, 80), ("float32", 160, 90)):
            launch = aot_launch(dtype, 8, 8 * d, arch)
            v = packed_variant(dtype, 8, d)
            k = compile_kernel(v, arch)
            bm = v["constexprs"]["BLOCK_M"]
            assert launch["kernel_name"] == k.metadata.name and launch["block_m"] == bm
            assert launch["threads"] == 32 * k.metadata.num_warps == 32 * v["options"]["num_warps"]
            assert launch["shared_mem"] == k.metadata.shared and launch["head_dim"] == d
            n = launch_numbers(launch, 3, 1000, 77, 16)
            assert n["grid"] == (-(-1000 // bm), 24, 1) and n["block"] == (launch["threads"], 1, 1), n
            assert n["extra_args"] == (1000, 77, 16) and n["shared_mem"] == k.metadata.shared
            full = ptx_params(k.asm["ptx"], k.metadata.name)
            assert ptx_params(launch["ptx"], k.metadata.name) == full[:len(KERNEL_ARGS)] < full
            ptxas_usage(launch["ptx"], arch)  # raises if ptxas rejects the trimmed PTX
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


class Expr(int):
    """A shape expression of known value, as tensorrt.plugin's ShapeExpr offers it."""
    is_fake, is_constant = False, True

    def constant_value(self):
        return int(self)


def stand_in(version="10.13.0"):
    """Modules shaped like tensorrt and tensorrt.plugin, recording what is registered (not TensorRT)."""
    plugin = types.ModuleType("tensorrt.plugin")
    plugin.defs = {}
    for kind in ("register", "autotune", "impl", "aot_impl"):
        setattr(plugin, kind, lambda pid, kind=kind: lambda f: plugin.defs.setdefault((pid, kind), f))
    for cls in ("TensorDesc", "Tensor", "SymExprs"):
        setattr(plugin, cls, type(cls, (), {}))
    plugin.SymIntExprs = type("SymIntExprs", (plugin.SymExprs,), {"from_tuple": staticmethod(tuple)})
    plugin.KernelLaunchParams = type("KernelLaunchParams", (), {})
    plugin.AutoTuneCombination = lambda types_, layouts: (types_, layouts)
    plugin.SymInt32 = int
    plugin.cdiv = lambda a, m: -(-a // m)
    tensorrt = types.ModuleType("tensorrt")
    tensorrt.__version__, tensorrt.plugin = version, plugin
    return tensorrt, plugin


def test_plugin_definition_against_a_stand_in(monkeypatch):
    tensorrt, plugin = stand_in()
    monkeypatch.setitem(sys.modules, "tensorrt", tensorrt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", plugin)
    monkeypatch.setattr(trt, "_REGISTERED", [])
    assert trt.tensorrt_unavailable() is None and "not built yet" in trt.tensorrt_runtime_unavailable()
    trt.register_plugin()
    trt.register_plugin()  # idempotent
    assert sorted(kind for _, kind in plugin.defs) == ["aot_impl", "autotune", "impl", "register"]
    assert {pid for pid, _ in plugin.defs} == {"ipadapter_instruct::DecoupledAttention"}
    tensors = ["q", "k", "v", "k_ip", "v_ip", "ip_scale", "num_heads"]
    params = {kind: list(inspect.signature(f).parameters) for (_, kind), f in plugin.defs.items()}
    assert params == {"register": tensors, "autotune": [*tensors, "outputs"], "impl": [*tensors, "outputs", "stream"],
                      "aot_impl": [*tensors, "outputs", "tactic"]}
    for f in plugin.defs.values():  # tensorrt.plugin reads annotations as classes, not strings
        assert all(not isinstance(p.annotation, str) for p in inspect.signature(f).parameters.values())
    combos = plugin.defs[(trt.PLUGIN_ID, "autotune")](*[None] * 8)
    assert combos == [(trt.autotune_types(), ",".join(["LINEAR"] * 7))]

    launch = dict(kernel_name="_packed_fwd_kernel", ptx=".entry _packed_fwd_kernel()", block_m=64, threads=256,
                  shared_mem=28672, heads=8)
    seen = []
    monkeypatch.setattr(trt, "aot_launch", lambda *a: seen.append(a) or launch)
    monkeypatch.setattr(trt, "cuda_arch", lambda: 86)
    desc = lambda *shape: types.SimpleNamespace(shape_expr=[Expr(s) for s in shape],  # noqa: E731
                                                dtype=types.SimpleNamespace(name="FLOAT"))
    q, k, k_ip = desc(3, 1000, 320), desc(3, 77, 320), desc(3, 16, 320)
    name, ptx, p, extra = plugin.defs[(trt.PLUGIN_ID, "aot_impl")](q, k, k, k_ip, k_ip, desc(3), 8, (q,), 0)
    assert seen == [("FLOAT", 8, 320, 86)] and name == b"_packed_fwd_kernel" and ptx == launch["ptx"].encode()
    n = trt.launch_numbers(launch, 3, 1000, 77, 16)
    assert (p.grid_x, p.grid_y, p.grid_z) == n["grid"] and p.block_x == 256 and p.shared_mem == 28672
    assert extra == n["extra_args"]

    monkeypatch.setattr(tensorrt, "__version__", "9.3.0")
    assert "has no tensorrt.plugin.aot_impl" in trt.tensorrt_unavailable()


@no_tensorrt
def test_engine_refuses_tensorrt_with_the_reason(tmp_path, capsys, cond_image):
    from engine import Pipeline
    from engine.__main__ import main

    image = tmp_path / "cond.png"
    cond_image.save(image)
    out = tmp_path / "out.png"
    argv = ["generate", "--model", str(tmp_path / "none"), "--image-encoder", str(tmp_path / "none"), "--adapter",
            str(tmp_path / "none.safetensors"), "--image", str(image), "--out", str(out), "--backend", "tensorrt"]
    assert main(argv) == 1
    assert one_line(capsys) == f"error: {REASON}" and not out.exists()
    with pytest.raises(SystemExit) as ex:
        main(argv[:-1] + ["onnxruntime"])
    assert ex.value.code == 2 and "invalid choice: 'onnxruntime'" in one_line(capsys)
    with pytest.raises(EngineError, match="unknown backend 'onnx'; choose one of pytorch, tensorrt"):
        Pipeline.from_pretrained("x", backend="onnx")


@no_tensorrt
def test_bench_skips_tensorrt_and_runs_the_rest(tmp_path, capsys):
    from bench.__main__ import main

    path = tmp_path / "e2e.json"
    assert main(["--device", "cpu", "--providers", "tensorrt,engine", "--batch", "1", "--steps", "1", "--repeats",
                 "1", "--cache", str(tmp_path / "w"), "--json", str(path)]) == 0
    assert f"tensorrt: skipped: {REASON}" in capsys.readouterr().out.splitlines()
    assert {r["provider"] for r in json.loads(path.read_text())} == {"engine"}
