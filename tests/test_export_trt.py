"""`python -m export trt` with TensorRT for RTX on this GPU-less machine, and `--backend tensorrt` around its plans.
(The CPU builds ask for it with `--trt rtx`; which TensorRT builds and runs, and for which GPUs: test_trt_choice.py.)

On the CPU: every graph of the tiny export builds into a .plan, fp32 and fp16, plugin form and standard-ops form;
the UNet's engine layers include the DecoupledAttention plugin (the builder's layer listing) and ip_scale is an
input of the plan; the plugin's type, shape and format rules against what TensorRT's parser makes of a one-node
graph; the install fix for the missing libtensorrt_rtx.so; profiles, bad or missing ONNX files and a failed build
as one-line errors that leave no plan behind; running the plans stops with TensorRT's own refusal. On a GPU: the
plans' latents against the PyTorch path, CUDA graphs against eager, the plugin's enqueue against the reference.
"""
import argparse
import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import GPU_SKIP, gpu
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.graph_names import GRAPHS
from ipadapter_instruct.engine.trt import link_rtx_library, load_tensorrt, support, tensorrt_unavailable
from ipadapter_instruct.engine.trt import plugin as tp
from ipadapter_instruct.export import trt
from ipadapter_instruct.export.onnx import FORMAT
from test_export_plugin import ROOT, export  # noqa: F401 (ROOT: the repository, for readers of this file)

NO_TRT = tensorrt_unavailable("rtx")
needs_trt = pytest.mark.skipif(NO_TRT is not None, reason=f"TensorRT for RTX does not import: {NO_TRT}")
ARCH = "86"  # one arch keeps the cubin compile short; the GPU tests build for their own
CROSS_ATTENTION_LAYERS = 4  # the tiny UNet's attn2 count


def cli_args(*argv):
    p = argparse.ArgumentParser()
    trt.add_arguments(p)
    return p.parse_args([str(a) for a in argv])


def io(name, shape):
    return {"name": name, "dtype": "float32", "shape": shape, "meaning": name}


@pytest.fixture
def export_dir(tmp_path):
    unet = {"file": "unet.onnx", "inputs": [io("sample", ["batch", 4, "latent_height", "latent_width"]),
                                            io("timestep", [1]), io("ip_scale", ["batch"])],
            "outputs": [io("noise", ["batch", 4, "latent_height", "latent_width"])],
            "axes": {"batch": {"min": 1, "opt": 2, "max": 8}, "latent_height": {"min": 8, "opt": 64, "max": 96},
                     "latent_width": {"min": 8, "opt": 64, "max": 96}},
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


# ----- checks made before TensorRT loads ---------------------------------------------------------------------

def test_run_needs_a_manifest(tmp_path, capsys):
    assert trt.run(cli_args(tmp_path)) == 2
    assert "has no manifest.json" in one_line(capsys)


@pytest.mark.parametrize("flag, value, message", [
    ("--min", "sample=1x4x8x8", "bad --min shape 'sample=1x4x8x8'"),
    ("--max", "sample:8x4x0x96", "bad --max shape 'sample:8x4x0x96'"),
    ("--opt", "sample:2x4xlarge", "bad --opt shape 'sample:2x4xlarge'"),
    ("--opt", "sample:2x4x64x64,sample:1x4x8x8", "--opt gives sample twice"),
    ("--opt", "sample:2x4x64", "opt shape 2x4x64 for input sample does not fit"),
    ("--opt", "sample:2x3x64x64", "opt shape 2x3x64x64 for input sample does not fit"),
    ("--min", "latent:1x4x8x8", "no graph has an input named latent"),
    ("--min", "sample:4x4x8x8", "needs min <= opt <= max"),
    ("--max", "sample:8x4x128x96", "puts latent_height at 128, outside the export's range 8-96"),
    ("--max", "sample:9x4x96x96", "puts batch at 9, outside the export's range 1-8"),
])
def test_bad_shapes_are_refused_before_tensorrt(export_dir, capsys, flag, value, message):
    assert trt.run(cli_args(export_dir, flag, value)) == 2
    err = one_line(capsys)
    assert err.startswith("python -m export trt: error: ") and message in err, err
    assert sorted(os.listdir(export_dir)) == ["manifest.json"]


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
        trt.precision("float32", True, False)  # TensorRT for RTX, TensorRT 11: no BuilderFlag.FP16


def test_plan_is_written_whole_or_not_at_all(tmp_path):
    trt.write_atomic(str(tmp_path / "unet.plan"), b"engine")
    assert (tmp_path / "unet.plan").read_bytes() == b"engine"
    with pytest.raises(TypeError):
        trt.write_atomic(str(tmp_path / "vae.plan"), object())
    assert sorted(os.listdir(tmp_path)) == ["unet.plan"]


def test_layer_listing_counts_the_plugin():
    listing = ["Name: /unet/attn2/DecoupledAttention, LayerType: custom_layer, Inputs: []",
               "Name: /unet/attn1/MatMul, LayerType: gemm, Inputs: []",
               "Name: DecoupledAttention_reformat, LayerType: reformat, Inputs: []"]
    assert trt.engine_layers(listing) == {"layers": 3, "plugin_layers": 1}


# ----- the plugin's rules, as plain values -------------------------------------------------------------------

F32, F16, I8 = "FLOAT", "HALF", "INT8"


@pytest.mark.parametrize("pos, types, ok", [
    (0, [F32], True), (0, [F16], True), (0, [I8], False),
    (1, [F16, F16], True), (1, [F16, F32], False),
    (4, [F32] * 5, True), (4, [F32] * 4 + [F16], False),
    (5, [F16] * 5 + [F32], True), (5, [F16] * 6, False),  # ip_scale: always float32
    (6, [F16] * 5 + [F32, F16], True), (6, [F16] * 5 + [F32, F32], False),  # the output: q's type
])
def test_plugin_types(pos, types, ok):
    assert tp.supports(pos, types, [True] * 7, F32, F16) is ok
    linear = [True] * 7
    linear[pos] = False
    assert tp.supports(pos, types, linear, F32, F16) is False  # linear only
    assert tp.output_type([F16, F16]) == [F16]


def test_plugin_shapes_and_fields():
    good = [(2, 64, 32), (2, 77, 32), (2, 77, 32), (2, 4, 32), (2, 4, 32), (2,)]
    tp.check_shapes(good, 8)
    tp.check_shapes([(-1, -1, 32)] * 5 + [(-1,)], 8)  # unknown dims pass until they are known
    bad = {"not a multiple of num_heads=3": (good, 3),
           "k_ip is 16 wide": (good[:3] + [(2, 4, 16)] + good[4:], 8),
           "ip_scale has batch 3": (good[:5] + [(3,)], 8),
           "k and v differ in length": (good[:2] + [(2, 76, 32)] + good[3:], 8),
           r"ip_scale must be \(B,\)": (good[:5] + [(2, 1)], 8)}
    for message, (dims, heads) in bad.items():
        with pytest.raises(EngineError, match=message):
            tp.check_shapes(dims, heads)
    assert tp.read_fields({"num_heads": [8], "aot": [1]}) == 8
    with pytest.raises(EngineError, match="one positive num_heads"):
        tp.read_fields({"aot": [1]})
    with pytest.raises(EngineError, match="no field scale"):
        tp.read_fields({"num_heads": [8], "scale": [1]})
    assert tp.launch_sizes((3, 4096, 320), (3, 77, 320), (3, 16, 320)) == (3, 4096, 77, 16)


def test_plugin_dir_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(tp.PLUGIN_DIR_ENV, raising=False)
    with pytest.raises(EngineError, match=tp.PLUGIN_DIR_ENV):
        tp.plugin_dir()
    monkeypatch.setenv(tp.PLUGIN_DIR_ENV, "/x/plugin")
    assert tp.plugin_dir() == "/x/plugin"


def test_missing_rtx_library_link_is_made_or_named(tmp_path, monkeypatch):
    import types

    libs = tmp_path / "tensorrt_rtx_libs"
    libs.mkdir()
    (libs / "__init__.py").write_text("")
    (libs / "libtensorrt_rtx.so.1").write_bytes(b"elf")
    monkeypatch.setitem(__import__("sys").modules, "tensorrt_rtx_libs",
                        types.SimpleNamespace(__file__=str(libs / "__init__.py")))
    link_rtx_library()
    assert os.readlink(libs / "libtensorrt_rtx.so") == "libtensorrt_rtx.so.1"
    link_rtx_library()  # already there: nothing to do
    os.remove(libs / "libtensorrt_rtx.so")
    if os.geteuid() != 0:  # root writes into a read-only folder anyway
        os.chmod(libs, 0o555)
        try:
            with pytest.raises(EngineError, match=r"run `ln -s libtensorrt_rtx.so.1 .*libtensorrt_rtx.so`"):
                link_rtx_library()
        finally:
            os.chmod(libs, 0o755)


# ----- TensorRT's parser and builder on the plugin -------------------------------------------------------------

def one_node_graph(path, dtype=np.float16, scale_dtype=np.float32, b=2, lq=16, lt=77, li=4, width=32, heads=8):
    import onnx
    from onnx import TensorProto, helper

    kind = {np.float16: TensorProto.FLOAT16, np.float32: TensorProto.FLOAT}
    shapes = dict(q=(b, lq, width), k=(b, lt, width), v=(b, lt, width), k_ip=(b, li, width), v_ip=(b, li, width))
    inputs = [helper.make_tensor_value_info(n, kind[dtype], s) for n, s in shapes.items()]
    inputs.append(helper.make_tensor_value_info("ip_scale", kind[scale_dtype], (b,)))
    node = helper.make_node(tp.NAME, [*shapes, "ip_scale"], ["out"], domain="ai.onnx.contrib",
                            plugin_namespace=tp.NAMESPACE, num_heads=heads, aot=1)
    out = helper.make_tensor_value_info("out", kind[dtype], None)
    model = helper.make_model(helper.make_graph([node], "g", inputs, [out]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.contrib", 1)])
    onnx.save(model, str(path))
    return path


def parse_and_build(path):
    t = load_tensorrt()
    tp.register_plugin(t)
    logger = t.Logger(t.Logger.ERROR)
    builder = t.Builder(logger)
    network = builder.create_network(1 << int(t.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = t.OnnxParser(network, logger)
    assert parser.parse_from_file(str(path)), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    plan = builder.build_serialized_network(network, builder.create_builder_config())
    return t, layers, plan


@needs_trt
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_parser_imports_the_node_as_the_plugin_with_its_type_and_shape(tmp_path, dtype):
    t, layers, plan = parse_and_build(one_node_graph(tmp_path / "one.onnx", dtype))
    (layer,) = [layer for layer in layers if layer.type == t.LayerType.PLUGIN_V3]
    out = layer.get_output(0)
    assert tuple(out.shape) == (2, 16, 32)  # get_output_shapes: q's
    assert out.dtype == (t.DataType.HALF if dtype == np.float16 else t.DataType.FLOAT)  # get_output_data_types
    assert plan is not None and plan.nbytes > 0  # supports_format_combination let the builder place it


@needs_trt
def test_a_half_ip_scale_is_refused_by_the_format_rules(tmp_path):
    _, _, plan = parse_and_build(one_node_graph(tmp_path / "bad.onnx", np.float16, np.float16))
    assert plan is None


# ----- the tiny export, built ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exports(tiny, tmp_path_factory):
    """The tiny weights exported four ways: (attention form, dtype) -> folder."""
    root = tmp_path_factory.mktemp("trt")
    out = {}
    for form in ("plugin", "onnx"):
        for dtype in ("float32", "float16"):
            folder = root / f"onnx-{form}-{dtype}"
            res = export("onnx", "--model", tiny["model"], "--image-encoder", tiny["image_encoder"], "--adapter",
                         tiny["adapter"], "--out", str(folder), "--attention", form, "--dtype", dtype,
                         "--device", "cpu")
            assert res.returncode == 0, res.stderr[-2000:]
            out[form, dtype] = folder
    return out


@pytest.fixture(scope="module")
def built(exports, tmp_path_factory):
    """Each export built by the CLI into its own folder: (form, dtype) -> (folder, stdout)."""
    out = {}
    for key, folder in exports.items():
        dest = tmp_path_factory.mktemp("plans") / f"{key[0]}-{key[1]}"
        res = export("trt", str(folder), "--out", str(dest), "--arch", ARCH, "--trt", "rtx")
        assert res.returncode == 0, res.stderr[-3000:]
        out[key] = dest, res.stdout
    return out


@needs_trt
@pytest.mark.parametrize("form", ["plugin", "onnx"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_every_graph_builds_with_the_plugin_in_the_unet_engine(built, form, dtype):
    folder, stdout = built[form, dtype]
    index = json.loads((folder / "engines.json").read_text())
    assert index["tensorrt"]["package"] == load_tensorrt("rtx").__name__ and index["dtype"] == dtype
    assert sorted(index["graphs"]) == sorted(GRAPHS)
    for name, g in index["graphs"].items():
        plan = folder / g["file"]
        assert plan.stat().st_size == g["bytes"] > 0, name
        assert g["engine"]["layers"] > 0, name  # the builder listed the engine's layers
    unet = index["graphs"]["unet"]
    assert "ip_scale" in unet["inputs"] and unet["profile"]["ip_scale"] == [[1], [2], [16]]
    plugin_layers = CROSS_ATTENTION_LAYERS if form == "plugin" else 0
    assert unet["plugin_layers"] == unet["engine"]["plugin_layers"] == plugin_layers
    assert all(g["engine"]["plugin_layers"] == 0 for n, g in index["graphs"].items() if n != "unet")
    assert ((folder / "plugin" / "index.json").exists()) is (form == "plugin")
    if form == "plugin":
        variants = json.loads((folder / "plugin" / "index.json").read_text())["variants"]
        assert {(v["arch"], v["dtype"], v["heads"], v["head_dim"]) for v in variants} == \
            {(f"sm_{ARCH}", dtype, 8, 4), (f"sm_{ARCH}", dtype, 8, 8)}  # the tiny UNet's two widths, 32 and 64
        assert b"ip_scale" in (folder / "unet.plan").read_bytes()
    manifest = json.loads((folder / "manifest.json").read_text())  # beside the plans, weights found from there
    assert os.path.isdir(os.path.join(folder, manifest["source"]["model"]))
    assert not [n for n in os.listdir(folder) if n.startswith(".trt-staging")]
    assert "unet: unet.plan" in stdout


@needs_trt
def test_a_missing_or_corrupt_onnx_file_is_one_line_and_leaves_no_plan(exports, tmp_path):
    src = exports["plugin", "float32"]
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    (broken / "unet.onnx").write_bytes(b"not a protobuf at all")
    res = export("trt", str(broken), "--out", str(tmp_path / "a"), "--arch", ARCH, "--trt", "rtx")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "unet.onnx: TensorRT's ONNX parser refused it" in res.stderr
    assert sorted(os.listdir(tmp_path / "a")) == []  # text_encoder etc. built first, and went with the staging
    os.remove(broken / "vae_decoder.onnx")
    res = export("trt", str(broken), "--out", str(tmp_path / "b"), "--trt", "rtx")
    assert res.returncode == 2 and res.stderr.strip().endswith("vae_decoder.onnx not found: export it again with "
                                                               "`python -m export onnx`")
    assert not (tmp_path / "b").exists()
    res = export("trt", str(src), "--graphs", "unet,vae", "--out", str(tmp_path / "c"), "--trt", "rtx")
    assert res.returncode == 2 and "has no graph vae" in res.stderr


@needs_trt
def test_rebuilding_one_graph_keeps_the_others(built, exports, tmp_path):
    folder = tmp_path / "plans"
    shutil.copytree(built["plugin", "float32"][0], folder)
    before = json.loads((folder / "engines.json").read_text())
    res = export("trt", str(exports["plugin", "float32"]), "--out", str(folder), "--graphs", "vae_decoder",
                 "--no-tf32", "--max", "latent:4x4x32x32", "--trt", "rtx")
    assert res.returncode == 0, res.stderr[-2000:]
    after = json.loads((folder / "engines.json").read_text())
    assert sorted(after["graphs"]) == sorted(before["graphs"]) and after["plugin_dir"] == "plugin"
    assert after["graphs"]["unet"] == before["graphs"]["unet"]
    assert after["graphs"]["vae_decoder"]["profile"]["latent"][2] == [4, 4, 32, 32] and after["tf32"] is False
    assert (folder / "plugin" / "index.json").exists()


@needs_trt
def test_fp16_flag_on_a_float32_export_says_what_to_do(exports, tmp_path):
    res = export("trt", str(exports["onnx", "float32"]), "--fp16", "--out", str(tmp_path / "x"), "--trt", "rtx")
    if hasattr(load_tensorrt("rtx").BuilderFlag, "FP16"):
        pytest.skip("this TensorRT has weak typing: --fp16 builds")
    assert res.returncode == 2 and "export with `python -m export onnx --dtype float16`" in res.stderr


# ----- running the plans ---------------------------------------------------------------------------------------

@needs_trt
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no GPU")
def test_running_the_plans_without_a_gpu_stops_with_tensorrts_own_reason(built, tiny, tmp_path, capsys,
                                                                           cond_image):
    from ipadapter_instruct.engine import Pipeline
    from ipadapter_instruct.engine.__main__ import main

    folder, _ = built["plugin", "float32"]
    with pytest.raises(EngineError, match="get_engine_validity says INVALID.*torch sees no CUDA GPU"):
        Pipeline.from_pretrained(tiny["model"], backend="tensorrt", engines=str(folder))
    image = tmp_path / "cond.png"
    cond_image.save(image)
    out = tmp_path / "out.png"
    argv = ["generate", "--model", tiny["model"], "--image-encoder", tiny["image_encoder"], "--adapter",
            tiny["adapter"], "--image", str(image), "--instruct", "use the style", "--out", str(out),
            "--backend", "tensorrt", "--engines", str(folder)]
    assert main(argv) == 1
    err = one_line(capsys)
    assert err.startswith("error: TensorRT for RTX") and "cannot run" in err and not out.exists()


def test_backend_and_engines_go_together(tiny, tmp_path):
    from ipadapter_instruct.engine import Pipeline

    with pytest.raises(EngineError, match="backend tensorrt needs the engine folder"):
        Pipeline.from_pretrained(tiny["model"], backend="tensorrt")
    with pytest.raises(EngineError, match="engines= is for backend='tensorrt'"):
        Pipeline.from_pretrained(tiny["model"], engines=str(tmp_path))
    with pytest.raises(EngineError, match="unknown backend 'onnx'; choose one of pytorch, tensorrt"):
        Pipeline.from_pretrained("x", backend="onnx")


@needs_trt
def test_engine_folder_errors_are_one_line(built, tiny, tmp_path):
    from ipadapter_instruct.engine import Pipeline
    from ipadapter_instruct.engine.trt.runtime import read_engines

    folder, _ = built["plugin", "float32"]
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    with pytest.raises(EngineError, match="built with the adapter .*, not .*other.safetensors"):
        Pipeline.from_pretrained(tiny["model"], adapter=str(tmp_path / "other.safetensors"), backend="tensorrt",
                                 engines=str(copy))
    with pytest.raises(EngineError, match="engines in .* are float32; dtype float16 needs engines built from"):
        Pipeline.from_pretrained(tiny["model"], dtype="float16", backend="tensorrt", engines=str(copy))
    os.remove(copy / "vae_decoder.plan")
    with pytest.raises(EngineError, match="vae_decoder's plan vae_decoder.plan is missing"):
        read_engines(str(copy))
    os.remove(copy / "engines.json")
    with pytest.raises(EngineError, match="has no engines.json; build the engines with `python -m export trt"):
        read_engines(str(copy))


@needs_trt
def test_bench_reports_tensorrt_skipped_on_the_cpu(tmp_path, capsys):
    from ipadapter_instruct.bench.__main__ import main

    path = tmp_path / "e2e.json"
    assert main(["--device", "cpu", "--providers", "tensorrt,engine", "--batch", "1", "--steps", "1", "--repeats",
                 "1", "--cache", str(tmp_path / "w"), "--json", str(path)]) == 0
    assert "tensorrt: skipped: TensorRT engines run on a CUDA GPU; this run is on cpu" in \
        capsys.readouterr().out.splitlines()
    assert {r["provider"] for r in json.loads(path.read_text())} == {"engine"}


# ----- on a GPU ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpu_built(exports, tmp_path_factory):
    """The fp32 exports built for this GPU (the CPU fixture builds for sm_86 only), by the TensorRT that can run
    plans on it (`python -m engine.trt.support` says which, or why none: then the GPU tests skip with that line)."""
    ok, why = support.runnable_here()
    if not ok:
        pytest.skip(why)
    major, minor = torch.cuda.get_device_capability()
    out = {}
    for form in ("plugin", "onnx"):
        dest = tmp_path_factory.mktemp("gpu-plans") / form
        res = export("trt", str(exports[form, "float32"]), "--out", str(dest), "--arch", f"{major}{minor}",
                     "--no-tf32")  # fp32 maths on both sides of the comparison
        assert res.returncode == 0, res.stderr[-3000:]
        out[form] = dest
    return out


def final_latents(pipe, cond_image, **kw):
    args = dict(prompt=["a red house", "a blue boat"], image=[cond_image, cond_image],
                instruct=["use the style", "use the composition"], scale=[0.7, 0.0], num_inference_steps=4,
                seed=[1, 2], output_type="latent")
    return pipe(**{**args, **kw})


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=GPU_SKIP)
@pytest.mark.parametrize("form", ["plugin", "onnx"])
def test_tensorrt_latents_match_the_pytorch_path(gpu_built, tiny, cond_image, form):
    from ipadapter_instruct.engine import Pipeline

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    ref = Pipeline.from_pretrained(tiny["model"], image_encoder=tiny["image_encoder"], adapter=tiny["adapter"],
                                   device="cuda", dtype="float32", attention_backend="sdpa")
    pipe = Pipeline.from_pretrained(tiny["model"], backend="tensorrt", engines=str(gpu_built[form]))
    want, got = final_latents(ref, cond_image), final_latents(pipe, cond_image)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    pipe.enable_cuda_graphs()
    for _ in range(2):  # the first call captures, the second replays
        torch.testing.assert_close(final_latents(pipe, cond_image), got, atol=1e-5, rtol=1e-5)


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=GPU_SKIP)
def test_plugin_enqueue_matches_the_reference(tmp_path, monkeypatch):
    from ipadapter_instruct.export.plugin import write_plugin
    from ipadapter_instruct.kernels.packed_attention import packed_attention_ref

    ok, why = support.runnable_here()
    if not ok:
        pytest.skip(why)
    t = load_tensorrt()
    major, minor = torch.cuda.get_device_capability()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("the plugin's cubins are compiled, not interpreted: run without TRITON_INTERPRET")
    write_plugin(str(tmp_path / "plugin"), (major * 10 + minor,), combos=[("float16", 8, 4)], log=lambda *a: None)
    monkeypatch.setenv(tp.PLUGIN_DIR_ENV, str(tmp_path / "plugin"))
    _, _, plan = parse_and_build(one_node_graph(tmp_path / "one.onnx", np.float16))
    engine = t.Runtime(t.Logger(t.Logger.ERROR)).deserialize_cuda_engine(plan)
    assert engine is not None
    ctx = engine.create_execution_context()
    g = torch.Generator("cuda").manual_seed(0)
    shapes = dict(q=(2, 16, 32), k=(2, 77, 32), v=(2, 77, 32), k_ip=(2, 4, 32), v_ip=(2, 4, 32))
    feeds = {n: torch.randn(s, generator=g, device="cuda", dtype=torch.float16) for n, s in shapes.items()}
    feeds["ip_scale"] = torch.tensor([0.7, 0.0], device="cuda")
    out = torch.empty(2, 16, 32, device="cuda", dtype=torch.float16)
    for n, x in feeds.items():
        ctx.set_tensor_address(n, x.data_ptr())
    ctx.set_tensor_address("out", out.data_ptr())
    assert ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    want = packed_attention_ref(*feeds.values(), 8)
    torch.testing.assert_close(out, want, atol=2e-3, rtol=2e-3)


# ----- serving the exported graphs -------------------------------------------------------------------------------

def test_the_server_serves_a_pipeline_of_exported_graphs(exports, cond_image):
    """The server around engine.exported's loop (ONNX Runtime here; TensorRT runs the same loop on a GPU): a request
    gives the pipeline's own image, /v1/models names the runtime, and a per-block scale is a 422 on its field."""
    import base64
    import io

    from PIL import Image

    from ipadapter_instruct.engine.server.config import ServerConfig
    from ipadapter_instruct.export.onnx_runtime import OnnxPipeline
    from server_utils import InProcessServer, decode_png, png_base64

    pipe = OnnxPipeline.from_export(str(exports["plugin", "float32"]))
    server = InProcessServer(ServerConfig(max_wait_ms=0), pipe)
    try:
        req = dict(prompt="a red house", image=png_base64(cond_image), instruct="use the style of this image",
                   num_inference_steps=2, seed=4, scale=0.6)
        r = server.request("POST", "/v1/generate", json=req)
        assert r.status_code == 200, r.text
        want = pipe(prompt="a red house", image=cond_image, instruct="use the style of this image",
                    num_inference_steps=2, seed=4, scale=0.6)[0]
        want = Image.open(io.BytesIO(base64.b64decode(png_base64(want)))).convert("RGB")
        assert np.abs(np.asarray(decode_png(r.json()["images"][0]), int) - np.asarray(want, int)).max() <= 1
        models = server.request("GET", "/v1/models").json()
        assert "onnxruntime (plugin attention)" in json.dumps(models)
        r = server.request("POST", "/v1/generate", json={**req, "scale": {"down": 0.5}})
        assert r.status_code == 422 and r.json()["error"]["field"] == "scale", r.text
    finally:
        server.close()


@needs_trt
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no GPU")
def test_serve_with_tensorrt_stops_with_one_line_where_the_plans_cannot_run(built):
    import subprocess
    import sys

    folder, _ = built["plugin", "float32"]
    r = subprocess.run([sys.executable, "-m", "engine", "serve", "--backend", "tensorrt", "--engines", str(folder),
                        "--port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "get_engine_validity says INVALID" in err[0], r.stderr
