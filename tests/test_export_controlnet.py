"""ControlNet in the export (`python -m export onnx --controlnet DIR`): a controlnet graph per net, the residual inputs
on the UNet graph, the manifest's record of the nets; OnnxPipeline's latents against the PyTorch Pipeline with
controlnet= (one and two nets, guidance window, guess mode, a control image and scale per request); invariants:
zero residuals are the UNet graph of an export without ControlNet, scale 0 is no ControlNet, rows are independent;
`verify` of the controlnet graphs; `python -m export run --control-image`; one TensorRT for RTX build on the CPU."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import NEGATIVE, PROMPT
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.trt import tensorrt_unavailable
from ipadapter_instruct.export.onnx import GRAPHS, export_onnx
from ipadapter_instruct.export.ort_ops import session
from ipadapter_instruct.export.verify import verify
from ipadapter_instruct.export.__main__ import main
from test_controlnet import controls, nets  # noqa: F401 (fixtures: two tiny ControlNets, two control images)

QUIET = dict(log=lambda *a: None)
STEPS = 3
BASE_INPUTS = ["sample", "timestep", "encoder_hidden_states", "ip_tokens", "ip_scale"]
# the tiny UNet (layers_per_block 1, channels 32, 64): conv_in's, block 0's resnet and downsampler, block 1's resnet
RESIDUALS = [(32, ""), (32, ""), (32, "/2"), (64, "/2")]
NO_TRT = tensorrt_unavailable()


@pytest.fixture(scope="module")
def one_net(tiny, nets, tmp_path_factory):
    """One net, plugin attention, through the CLI's parser (docs/export-tensorrt-cpp.md's command)."""
    out = tmp_path_factory.mktemp("cn-onnx") / "one"
    assert main(["onnx", "--model", tiny["model"], "--image-encoder", tiny["image_encoder"], "--adapter",
                 tiny["adapter"], "--controlnet", nets[0], "--out", str(out), "--device", "cpu"]) == 0
    return out


@pytest.fixture(scope="module")
def two_nets(tiny, nets, tmp_path_factory):
    out = tmp_path_factory.mktemp("cn-onnx") / "two"
    export_onnx(tiny["model"], tiny["image_encoder"], tiny["adapter"], str(out), attention="onnx", controlnet=nets,
                device="cpu", **QUIET)
    return out


@pytest.fixture(scope="module")
def plain_unet(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("cn-onnx") / "plain"
    export_onnx(tiny["model"], tiny["image_encoder"], tiny["adapter"], str(out), graphs=("unet",), device="cpu",
                **QUIET)
    return out


def torch_pipe(tiny, controlnet=None):
    from ipadapter_instruct.engine import Pipeline
    pipe = Pipeline.from_pretrained(tiny["model"], image_encoder=tiny["image_encoder"], adapter=tiny["adapter"],
                                    device="cpu", dtype="float32", controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def onnx_pipe(folder):
    from ipadapter_instruct.export.onnx_runtime import OnnxPipeline
    pipe = OnnxPipeline.from_export(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipes(tiny, nets, one_net):
    """(PyTorch Pipeline with the first net, OnnxPipeline of its export)."""
    return torch_pipe(tiny, nets[0]), onnx_pipe(one_net)


def call(pipe, cond_image, **kw):
    args = dict(prompt=[PROMPT, "a blue boat"], image=cond_image, instruct=["use the style", "take the object"],
                negative_prompt=NEGATIVE, scale=[0.8, 0.3], num_inference_steps=STEPS, seed=[1, 2],
                output_type="latent")
    return pipe(**{**args, **kw})


def test_the_graphs_and_the_manifest(one_net, plain_unet, nets):
    import onnx

    manifest = json.loads((one_net / "manifest.json").read_text())
    assert list(manifest["graphs"]) == [*GRAPHS, "controlnet"]
    [entry] = manifest["controlnets"]
    assert entry["graph"] == "controlnet" and entry["relative"] and entry["conditioning_channels"] == 3
    assert os.path.normpath(one_net / entry["source"]) == os.path.normpath(nets[0])
    np.testing.assert_allclose(entry["guess_mode_scales"], np.logspace(-1, 0, len(RESIDUALS) + 1), rtol=1e-6)
    down = [["batch", c, f"latent_height{d}", f"latent_width{d}"] for c, d in RESIDUALS]
    mid = ["batch", 64, "latent_height/2", "latent_width/2"]
    cn = manifest["graphs"]["controlnet"]
    assert [(t["name"], t["shape"]) for t in cn["inputs"]] == [
        ("sample", ["batch", 4, "latent_height", "latent_width"]), ("timestep", ["batch"]),
        ("encoder_hidden_states", ["batch", 77, 32]), ("controlnet_cond", ["batch", 3, "image_height", "image_width"]),
        ("conditioning_scale", ["batch"])]
    assert [(t["name"], t["shape"]) for t in cn["outputs"]] == \
        [(f"down_block_res_samples_{i}", s) for i, s in enumerate(down)] + [("mid_block_res_sample", mid)]
    assert cn["profiles"]["opt"]["controlnet_cond"] == [2, 3, 64, 64] and cn["plugin_nodes"] == 0
    unet = manifest["graphs"]["unet"]
    names = [f"down_block_additional_residuals_{i}" for i in range(len(down))] + ["mid_block_additional_residual"]
    assert [t["name"] for t in unet["inputs"]] == BASE_INPUTS + names and unet["controlnet_residuals"] == names
    assert unet["profiles"]["max"]["mid_block_additional_residual"] == [16, 64, 16, 16]  # latent 32 halved
    graph = onnx.load(str(one_net / "unet.onnx"), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert dims["down_block_additional_residuals_2"] == down[2]
    # without --controlnet the UNet graph and its manifest entry are what they were
    plain = json.loads((plain_unet / "manifest.json").read_text())
    assert "controlnets" not in plain and "controlnet_residuals" not in plain["graphs"]["unet"]
    assert [t["name"] for t in plain["graphs"]["unet"]["inputs"]] == BASE_INPUTS


@pytest.mark.parametrize("kw", [dict(controlnet_conditioning_scale=[1.0, 0.4]),
                                dict(controlnet_conditioning_scale=0.5, control_guidance_start=0.3,
                                     control_guidance_end=0.7),
                                dict(guess_mode=True)], ids=["per-request", "window", "guess"])
def test_generation_matches_the_pytorch_controlnet_pipeline(pipes, controls, cond_image, kw):
    want = call(pipes[0], cond_image, control_image=controls, **kw)
    torch.testing.assert_close(call(pipes[1], cond_image, control_image=controls, **kw), want, atol=1e-4, rtol=1e-4)


def test_two_nets_match_the_pytorch_pipeline(two_nets, tiny, nets, controls, cond_image):
    kw = dict(control_image=list(controls), controlnet_conditioning_scale=[0.7, 1.2])
    want = call(torch_pipe(tiny, nets), cond_image, **kw)
    pipe = onnx_pipe(two_nets)
    torch.testing.assert_close(call(pipe, cond_image, **kw), want, atol=1e-4, rtol=1e-4)
    with pytest.raises(EngineError, match="2 ControlNets are loaded: give control_image as a list of 2"):
        call(pipe, cond_image, control_image=controls[0])


def test_scale_zero_is_no_controlnet(pipes, tiny, controls, cond_image):
    # every step without residuals (scale 0): the UNet graph runs on zeros; the PyTorch pipeline has no ControlNet
    got = call(pipes[1], cond_image, control_image=controls[0], controlnet_conditioning_scale=0.0)
    torch.testing.assert_close(got, call(torch_pipe(tiny), cond_image), atol=1e-4, rtol=1e-4)


def graph_feeds(folder, graph, b=3, h=8, w=12, seed=0):
    from ipadapter_instruct.export.graph_spec import Tensor, sample_inputs
    entry = json.loads((folder / "manifest.json").read_text())["graphs"][graph]
    inputs = [Tensor(t["name"], t["dtype"], tuple(t["shape"]), t["meaning"], t["fill"]) for t in entry["inputs"]]
    sizes = dict(batch=b, latent_height=h, latent_width=w, image_height=4 * h, image_width=4 * w)
    return {k: v.numpy() for k, v in sample_inputs(inputs, sizes, seed=seed).items()}


def test_graph_invariants(one_net, plain_unet):
    # zero residuals: the UNet graph of an export without ControlNet; a residual on one row moves that row alone
    feeds = graph_feeds(one_net, "unet")
    residuals = [k for k in feeds if "residual" in k]
    zeros = {**feeds, **{k: np.zeros_like(feeds[k]) for k in residuals}}
    with_res = session(str(one_net / "unet.onnx"))
    base = session(str(plain_unet / "unet.onnx")).run(None, {k: feeds[k] for k in BASE_INPUTS})[0]
    assert np.abs(with_res.run(None, zeros)[0] - base).max() < 1e-5
    one_row = {**zeros, **{k: feeds[k] * np.array([0, 1, 0], np.float32).reshape(3, 1, 1, 1) for k in residuals}}
    moved = with_res.run(None, one_row)[0]
    assert np.abs(moved[[0, 2]] - base[[0, 2]]).max() < 1e-5 and np.abs(moved[1] - base[1]).max() > 1e-3
    # the controlnet graph: conditioning_scale multiplies each row's residuals (0: exactly zero)
    cn = session(str(one_net / "controlnet.onnx"))
    feeds = graph_feeds(one_net, "controlnet", seed=1)
    full = cn.run(None, {**feeds, "conditioning_scale": np.ones(3, np.float32)})
    scaled = cn.run(None, {**feeds, "conditioning_scale": np.array([0.0, 0.5, 1.5], np.float32)})
    for f, s in zip(full, scaled):
        assert not s[0].any() and np.abs(s[1:] - f[1:] * np.array([0.5, 1.5]).reshape(2, 1, 1, 1)).max() < 1e-5


def test_verify_covers_the_controlnet_graphs(two_nets, tiny, nets, tmp_path):
    moved = tmp_path / "moved" / "deeper"
    shutil.copytree(two_nets, moved)  # the relative paths to the weights and the nets no longer hold
    sources = dict(model=tiny["model"], image_encoder=tiny["image_encoder"], adapter=tiny["adapter"])
    with pytest.raises(EngineError, match="the ControlNet of controlnet is not at .*pass --controlnet DIR"):
        verify(str(moved), graphs=["controlnet"], sources=sources, **QUIET)
    with pytest.raises(EngineError, match="--controlnet is given 1 times; the export has 2 ControlNet"):
        verify(str(moved), graphs=["controlnet"], sources={**sources, "controlnet": nets[:1]}, **QUIET)
    rows = verify(str(moved), batch=3, height=48, width=80, graphs=["unet", "controlnet", "controlnet_1"],
                  sources={**sources, "controlnet": nets}, **QUIET)
    assert all(r["ok"] and r["max_abs_diff"] < 1e-4 for r in rows)
    assert [r["graph"] for r in rows] == ["unet"] * 3 + ["controlnet"] * 2 + ["controlnet_1"] * 2
    cn = rows[3:]
    assert [r["case"] for r in cn] == ["conditioning_scale 1", "conditioning_scale per row 0/0.75/1.5"] * 2
    assert all(r["outputs"] == len(RESIDUALS) + 1 and r["shape"] == [3, 32, 12, 20] for r in cn)


def test_errors_are_one_line(tiny, nets, one_net, pipes, cond_image, tmp_path, monkeypatch):
    import ipadapter_instruct.export.onnx as exp

    pooled = tmp_path / "shuffle"
    shutil.copytree(nets[0], pooled)
    config = json.loads((pooled / "config.json").read_text())
    (pooled / "config.json").write_text(json.dumps({**config, "global_pool_conditions": True}))
    with pytest.raises(EngineError, match=r"the ControlNet .*shuffle pools its conditions"):
        export_onnx(tiny["model"], tiny["image_encoder"], tiny["adapter"], str(tmp_path / "x"), controlnet=pooled,
                    graphs=("controlnet",), **QUIET)
    with pytest.raises(EngineError, match="unknown graph.s. controlnet_1 for a text-to-image model with 1 "
                                          "ControlNet.s.; choose from .*, controlnet$"):
        export_onnx(tiny["model"], tiny["image_encoder"], tiny["adapter"], str(tmp_path / "x"), controlnet=nets[0],
                    graphs=("controlnet_1",), **QUIET)
    monkeypatch.setattr(exp, "model_kind", lambda model: "edit")
    with pytest.raises(EngineError, match="exporting a ControlNet with InstructPix2Pix is not built"):
        exp.export_onnx(tiny["model"], tiny["image_encoder"], tiny["adapter"], str(tmp_path / "x"),
                        controlnet=nets[0], **QUIET)
    assert not (tmp_path / "x").exists()
    lacking = tmp_path / "lacking"
    shutil.copytree(one_net, lacking)
    manifest = json.loads((lacking / "manifest.json").read_text())
    del manifest["graphs"]["controlnet"]
    (lacking / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="lacks controlnet: its UNet takes ControlNet residuals"):
        onnx_pipe(lacking)
    with pytest.raises(EngineError, match="give control_image="):
        call(pipes[1], cond_image)


def test_run_takes_a_control_image(one_net, pipes, controls, cond_image, tmp_path):
    paths = [tmp_path / "edges.png", tmp_path / "cond.png", tmp_path / "out.png"]
    controls[0].save(paths[0])
    cond_image.save(paths[1])
    assert main(["run", str(one_net), "--prompt", PROMPT, "--image", str(paths[1]), "--instruct", "use the style",
                 "--steps", "2", "--seed", "3", "--control-image", str(paths[0]), "--controlnet-scale", "0.6",
                 "--out", str(paths[2])]) == 0
    from ipadapter_instruct.engine.pipeline import DEFAULT_NEGATIVE
    want = pipes[1](PROMPT, cond_image, "use the style", DEFAULT_NEGATIVE, num_inference_steps=2, seed=3,
                    control_image=controls[0], controlnet_conditioning_scale=0.6)[0]
    assert np.abs(np.asarray(Image.open(paths[2]).convert("RGB"), int) - np.asarray(want, int)).max() <= 1


@pytest.mark.skipif(NO_TRT is not None, reason=f"TensorRT does not import: {NO_TRT}")
def test_tensorrt_builds_the_controlnet_and_the_unet_with_residual_inputs(two_nets, nets, tmp_path):
    out = tmp_path / "plans"
    assert main(["trt", str(two_nets), "--out", str(out), "--graphs", "controlnet,unet"]) == 0  # no plugin: no cubins
    index = json.loads((out / "engines.json").read_text())
    assert sorted(index["graphs"]) == ["controlnet", "unet"]
    assert index["graphs"]["controlnet"]["inputs"] == ["sample", "timestep", "encoder_hidden_states",
                                                       "controlnet_cond", "conditioning_scale"]
    assert index["graphs"]["controlnet"]["profile"]["controlnet_cond"] == [[1, 3, 32, 32], [2, 3, 64, 64],
                                                                         [16, 3, 128, 128]]
    unet = index["graphs"]["unet"]
    assert unet["inputs"][len(BASE_INPUTS):] == json.loads((two_nets / "manifest.json").read_text())[
        "graphs"]["unet"]["controlnet_residuals"]
    assert unet["profile"]["down_block_additional_residuals_2"] == [[1, 32, 4, 4], [2, 32, 8, 8], [16, 32, 16, 16]]
    manifest = json.loads((out / "manifest.json").read_text())  # the nets found from beside the plans
    assert [os.path.normpath(out / c["source"]) for c in manifest["controlnets"]] == \
        [os.path.normpath(n) for n in nets]
