"""`python -m export onnx` and `verify` on the tiny weights: both attention forms, the plugin nodes' spelling,
ONNX Runtime against PyTorch (the engine's own path, and plain diffusers for the scale-0 invariant), and
clear errors for bad folders, corrupt graphs and out-of-profile sizes."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.export.onnx import GRAPHS, export_onnx, read_manifest, source_paths
from ipadapter_instruct.export.ort_ops import session
from ipadapter_instruct.export.verify import verify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = dict(log=lambda *a: None)


def run_export(*args):
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def plugin_dir(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "plugin"
    res = run_export("onnx", "--model", tiny["model"], "--image-encoder", tiny["image_encoder"],
                     "--adapter", tiny["adapter"], "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def onnx_dir(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "standard"
    export_onnx(tiny["model"], tiny["image_encoder"], tiny["adapter"], str(out), attention="onnx", **QUIET)
    return out


def cross_attention_layers(tiny):
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(tiny["model"], subfolder="unet")
    return [n for n in unet.attn_processors if n.endswith("attn2.processor")], unet


def test_plugin_export_writes_every_graph_with_plugin_nodes(plugin_dir, tiny):
    manifest = json.loads((plugin_dir / "manifest.json").read_text())
    assert sorted(os.listdir(plugin_dir)) == sorted([f"{g}.onnx" for g in GRAPHS] + ["manifest.json"])
    assert manifest["attention"] == "plugin" and set(manifest["graphs"]) == set(GRAPHS)
    layers, unet = cross_attention_layers(tiny)
    model = onnx.load(str(plugin_dir / "unet.onnx"))
    onnx.checker.check_model(model, full_check=True)
    nodes = [n for n in model.graph.node if n.op_type == "DecoupledAttention"]
    assert len(nodes) == len(layers) == manifest["graphs"]["unet"]["plugin_nodes"]
    heads = {n: unet.get_submodule(n[: -len(".processor")]).heads for n in layers}
    scale_in = {i.name: i for i in model.graph.input}["ip_scale"]
    assert scale_in.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param for d in scale_in.type.tensor_type.shape.dim] == ["batch"]
    for n in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert n.domain == "ai.onnx.contrib" and attrs["plugin_namespace"] == b"ipadapter_instruct"
        assert attrs["aot"] == 1 and attrs["num_heads"] in set(heads.values())
        assert len(n.input) == 6 and n.input[5] == "ip_scale"  # strength straight from the graph input
    for g in set(GRAPHS) - {"unet"}:
        assert not any(n.op_type == "DecoupledAttention" for n in onnx.load(str(plugin_dir / f"{g}.onnx")).graph.node)
    profile = manifest["graphs"]["unet"]["profiles"]
    assert profile["min"]["sample"][0] <= profile["opt"]["sample"][0] <= profile["max"]["sample"][0]
    assert manifest["graphs"]["unet"]["dynamic_axes"]["sample"] == {"0": "batch", "2": "latent_height",
                                                                   "3": "latent_width"}


def test_standard_ops_export_has_no_plugin(onnx_dir):
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    assert manifest["attention"] == "onnx" and manifest["graphs"]["unet"]["plugin_nodes"] == 0
    ops = {n.op_type for n in onnx.load(str(onnx_dir / "unet.onnx")).graph.node}
    assert "DecoupledAttention" not in ops and "Softmax" in ops


@pytest.mark.parametrize("form", ["plugin", "onnx"])
def test_verify_agrees_within_1e4_for_three_scale_cases(form, plugin_dir, onnx_dir):
    rows = verify(str(plugin_dir if form == "plugin" else onnx_dir), batch=3, height=48, width=80, **QUIET)
    assert {r["graph"] for r in rows} == set(GRAPHS) and all(r["ok"] for r in rows)
    unet = [r for r in rows if r["graph"] == "unet"]
    assert [r["case"].split(" ")[1] for r in unet] == ["0", "0.5", "per"] and unet[2]["case"].endswith("0/0.75/1.5")
    assert all(r["max_abs_diff"] < 1e-4 and r["shape"] == [3, 4, 12, 20] for r in unet)
    assert all(r["max_abs_diff"] < 1e-4 for r in rows)


def unet_feeds(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(b, 4, 16, 12, generator=g), timestep=torch.rand(b, generator=g) * 999,
                encoder_hidden_states=torch.randn(b, 77, 32, generator=g), ip_tokens=torch.randn(b, 4, 32, generator=g))


def test_scale_zero_graph_is_the_plain_diffusers_unet(plugin_dir, tiny):
    # independent of the engine: diffusers' own UNet with its default processors, no adapter at all
    _, unet = cross_attention_layers(tiny)
    feeds = unet_feeds()
    with torch.no_grad():
        base = unet(feeds["sample"], feeds["timestep"], encoder_hidden_states=feeds["encoder_hidden_states"]).sample
    sess = session(str(plugin_dir / "unet.onnx"))
    run = lambda s: sess.run(None, {**{k: v.numpy() for k, v in feeds.items()}, "ip_scale": s})[0]  # noqa: E731
    assert np.abs(run(np.zeros(3, np.float32)) - base.numpy()).max() < 1e-4
    mixed = run(np.array([0.0, 1.0, 0.0], np.float32))  # rows are independent: row 1 alone moves
    assert np.abs(mixed[[0, 2]] - base.numpy()[[0, 2]]).max() < 1e-4
    assert np.abs(mixed[1] - base.numpy()[1]).max() > 1e-3


def test_plugin_and_standard_graphs_agree(plugin_dir, onnx_dir):
    feeds = {k: v.numpy() for k, v in unet_feeds(seed=3).items()}
    feeds["ip_scale"] = np.array([0.2, 0.9, 1.4], np.float32)
    a = session(str(plugin_dir / "unet.onnx")).run(None, feeds)[0]
    b = session(str(onnx_dir / "unet.onnx"), plugin=False).run(None, feeds)[0]
    assert np.abs(a - b).max() < 1e-5


def test_float16_export_verifies(tiny, tmp_path):
    out = tmp_path / "fp16"
    export_onnx(tiny["model"], tiny["image_encoder"], tiny["adapter"], str(out), dtype="float16",
                graphs=("unet", "text_encoder"), **QUIET)
    model = onnx.load(str(out / "unet.onnx"))
    assert {i.name: i.type.tensor_type.elem_type for i in model.graph.input}["sample"] == onnx.TensorProto.FLOAT16
    rows = verify(str(out), batch=2, **QUIET)
    assert len(rows) == 4 and all(r["ok"] for r in rows)


def test_verify_errors_are_one_line(plugin_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(plugin_dir, bad)
    res = run_export("verify", str(bad), "--batch", "99")
    assert res.returncode == 2 and "batch = 99 is outside the exported profile [1, 16]" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    with pytest.raises(EngineError, match="multiple of the VAE factor 4"):
        verify(str(bad), height=50, **QUIET)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["graphs"]["unet"]["inputs"][2]["shape"][2] = 99  # wrong-shaped: the graph says 32 wide tokens
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match=r"input encoder_hidden_states has shape \['batch', 77, 32\] but the "
                                          r"manifest says \['batch', 77, 99\]"):
        verify(str(bad), **QUIET)
    shutil.copy(plugin_dir / "manifest.json", bad / "manifest.json")
    (bad / "unet.onnx").write_bytes((plugin_dir / "unet.onnx").read_bytes()[:5000])  # truncated: corrupt
    res = run_export("verify", str(bad))
    assert res.returncode == 2 and "unet.onnx: not a valid ONNX model" in res.stderr
    os.remove(bad / "manifest.json")
    with pytest.raises(EngineError, match="has no manifest.json"):
        verify(str(bad), **QUIET)


def test_failed_export_leaves_nothing_behind(tiny, tmp_path, monkeypatch):
    import ipadapter_instruct.export.onnx as exp

    real = exp.export_graph

    def fail_on_unet(spec, path, opset):
        if spec.name == "unet":
            raise RuntimeError("simulated exporter failure")
        real(spec, path, opset)

    monkeypatch.setattr(exp, "export_graph", fail_on_unet)
    out = tmp_path / "out"
    with pytest.raises(EngineError, match="exporting unet failed: RuntimeError: simulated exporter failure"):
        exp.export_onnx(tiny["model"], tiny["image_encoder"], tiny["adapter"], str(out), **QUIET)
    assert os.listdir(tmp_path) == []
    with pytest.raises(EngineError, match="--opset must be between 14 and 21"):
        exp.export_onnx(tiny["model"], tiny["image_encoder"], tiny["adapter"], str(out), opset=11, **QUIET)


def test_weights_past_2gb_go_to_one_data_file_per_graph(plugin_dir, tmp_path):
    # the exporter writes a >2 GB model's weights as one loose file per tensor, with names that collide across
    # graphs in one folder; the export gathers them into <name>.onnx.data (simulated here on the tiny UNet)
    from ipadapter_instruct.export.onnx import gather_external_data

    loose = tmp_path / "loose"
    loose.mkdir()
    onnx.save_model(onnx.load(str(plugin_dir / "unet.onnx")), str(loose / "unet.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0)
    assert len(os.listdir(loose)) > 20
    out = tmp_path / "out"
    out.mkdir()
    gather_external_data(str(loose / "unet.onnx"), str(out / "unet.onnx"))
    assert sorted(os.listdir(out)) == ["unet.onnx", "unet.onnx.data"]
    feeds = {k: v.numpy() for k, v in unet_feeds(seed=5).items()}
    feeds["ip_scale"] = np.array([0.3, 0.0, 1.1], np.float32)
    a = session(str(plugin_dir / "unet.onnx")).run(None, feeds)[0]
    assert np.array_equal(session(str(out / "unet.onnx")).run(None, feeds)[0], a)


def test_ip_adapter_plus_exports_an_image_only_projector(tiny, plus_dir, tmp_path):
    out = tmp_path / "plus"
    export_onnx(tiny["model"], tiny["image_encoder"], str(plus_dir / "plus.safetensors"), str(out),
                graphs=("projector", "unet"), **QUIET)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["adapter_kind"] == "plus" and set(manifest["graphs"]) == {"projector", "unet"}
    assert [t["name"] for t in manifest["graphs"]["projector"]["inputs"]] == ["image_tokens"]
    rows = verify(str(out), batch=2, **QUIET)
    assert len(rows) == 4 and all(r["ok"] and r["max_abs_diff"] < 1e-4 for r in rows)


@pytest.mark.parametrize("mode", ["auto", "simple"])
def test_generation_from_the_graphs_matches_the_engine(plugin_dir, instruct_pipe, cond_image, mode):
    # the five graphs with the engine's requests, guidance and scheduler around them: same latents and images
    from ipadapter_instruct.export.onnx_runtime import OnnxPipeline

    onnx_pipe = OnnxPipeline.from_export(str(plugin_dir))
    onnx_pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=["a red house", "a cat"], image=cond_image, instruct=["use the style", "take the object"],
              scale=[0.8, 0.3], guidance_mode=mode, num_inference_steps=3, seed=[0, 1], scheduler="ddim")
    want = instruct_pipe(**kw, output_type="latent")
    got = onnx_pipe(**kw, output_type="latent")
    assert got.shape == want.shape and (got - want).abs().max() < 1e-4
    images = onnx_pipe(**kw)
    assert len(images) == 2 and images[0].size == instruct_pipe(**kw)[0].size
    with pytest.raises(EngineError, match="per-block scales"):
        onnx_pipe(**{**kw, "scale": {"up": 1.0}}, output_type="latent")


def test_a_killed_exports_staging_folder_is_removed_by_the_next(tiny, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"out.partial-{dead.stdout.strip()}"
    stale.mkdir()
    (stale / "unet.onnx").write_bytes(b"half")
    alive = tmp_path / f"out.partial-{os.getppid()}"  # a live process's (this test's parent's) stays
    alive.mkdir()
    export_onnx(tiny["model"], tiny["image_encoder"], tiny["adapter"], str(tmp_path / "out"),
                graphs=("text_encoder",), **QUIET)
    assert not stale.exists() and alive.exists()
    assert sorted(os.listdir(tmp_path / "out")) == ["manifest.json", "text_encoder.onnx"]


def test_reexport_replaces_an_earlier_exports_weight_file(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "text_encoder.onnx.data").write_bytes(b"weights of an earlier, larger export")
    export_onnx(tiny["model"], tiny["image_encoder"], tiny["adapter"], str(out), graphs=("text_encoder",), **QUIET)
    assert sorted(os.listdir(out)) == ["manifest.json", "text_encoder.onnx"]


def copy_laid_out(paths, root):
    """The folders `paths` copied under `root`, lying relative to each other as they do now. -> the copies."""
    common = os.path.commonpath([str(p) for p in paths])
    copies = [root / os.path.relpath(str(p), common) for p in paths]
    for src, dst in zip(paths, copies):
        shutil.copytree(src, dst)
    return copies


def test_export_and_weights_move_together_or_the_error_names_the_override(plugin_dir, tiny, tmp_path, cond_image,
                                                                        capsys):
    from ipadapter_instruct.export.__main__ import main
    from ipadapter_instruct.export.onnx_runtime import OnnxPipeline

    src = json.loads((plugin_dir / "manifest.json").read_text())["source"]
    assert sorted(src["relative"]) == ["adapter", "image_encoder", "model"]
    assert not any(os.path.isabs(src[k]) for k in src["relative"])
    before = copy_laid_out([plugin_dir, os.path.dirname(tiny["model"])], tmp_path / "before")
    os.rename(tmp_path / "before", tmp_path / "after")  # both move together: the relative paths still hold
    export, weights = (tmp_path / "after" / p.relative_to(tmp_path / "before") for p in before)
    found = source_paths(read_manifest(str(export)), str(export))  # the moved copies, not the fixture's originals
    assert found == {"model": str(weights / "model"), "image_encoder": str(weights / "image_encoder"),
                     "adapter": str(weights / "adapter.safetensors")}
    assert all(r["ok"] for r in verify(str(export), graphs=["text_encoder"], **QUIET))
    OnnxPipeline.from_export(str(export))

    moved = tmp_path / "elsewhere"
    os.rename(weights, moved)  # only the weights move: one line naming the lost path and the flag to use
    res = run_export("verify", str(export), "--graphs", "text_encoder")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert f"the model this export was made from is not at {weights / 'model'}" in res.stderr
    assert "pass --model PATH" in res.stderr
    overrides = ["--model", moved / "model", "--image-encoder", moved / "image_encoder"]
    res = run_export("verify", str(export), "--graphs", "text_encoder", *map(str, overrides),
                     "--adapter", str(moved / "adapter.safetensors"))
    assert res.returncode == 0 and "1/1 checks within tolerance" in res.stdout, res.stderr[-2000:]
    with pytest.raises(EngineError, match=f"image encoder .* not at {weights / 'image_encoder'} .* --image-encoder"):
        OnnxPipeline.from_export(str(export), model=str(moved / "model"))
    cond_image.save(tmp_path / "cond.png")
    argv = ["run", export, "--prompt", "a cat", "--image", tmp_path / "cond.png", "--instruct", "use the style",
            "--steps", "1", "--out", tmp_path / "out.png", *overrides]
    assert main([str(a) for a in argv]) == 0 and (tmp_path / "out.png").is_file()
    # no --seed: a random one (not a fixed default), printed and in the PNG's parameters, which gives the image back
    from ipadapter_instruct.export.__main__ import _parser
    assert _parser().parse_args(["run", "d", "--prompt", "p", "--image", "i", "--out", "o.png"]).seed is None
    seed = capsys.readouterr().err.strip().splitlines()[-1].removeprefix("seed: ")
    with Image.open(tmp_path / "out.png") as im:
        assert f"Seed: {seed}," in im.text["parameters"]
        first = im.convert("RGB").tobytes()
    argv[argv.index("--steps")] = "--num-inference-steps"
    argv[argv.index("--image")] = "--ip-adapter-image"
    assert main([str(a) for a in [*argv, "--seed", seed, "--out", tmp_path / "again.png"]]) == 0
    with Image.open(tmp_path / "again.png") as im:
        assert im.convert("RGB").tobytes() == first

    manifest = json.loads((export / "manifest.json").read_text())  # as written before paths were relative
    manifest["source"] = {"model": str(moved / "model"), "image_encoder": str(moved / "image_encoder"),
                          "adapter": str(moved / "adapter.safetensors"), "adapter_kind": src["adapter_kind"]}
    (export / "manifest.json").write_text(json.dumps(manifest))
    assert all(r["ok"] for r in verify(str(export), graphs=["text_encoder"], **QUIET))


def test_step_batching_refuses_exported_graphs_at_start_up(plugin_dir):
    from ipadapter_instruct.engine.server.config import ServerConfig
    from ipadapter_instruct.export.onnx_runtime import OnnxPipeline
    from server_utils import InProcessServer

    with pytest.raises(RuntimeError, match="--batching step runs on the PyTorch backend; this server loads exported "
                                           "graphs: use --batching request"):
        InProcessServer(ServerConfig(batching="step", warmup=False), OnnxPipeline.from_export(str(plugin_dir)))
