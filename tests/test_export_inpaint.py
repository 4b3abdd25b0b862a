"""Starting from a photo on the exported graphs: a 9-channel inpainting model exports like the 8-channel edit one
(the UNet's channels in the manifest, the adapter attention as plugin nodes, vae_encoder always), a text-to-image
model's vae_encoder with `--img2img`; the encoder gives the latent distribution's moments, so OnnxPipeline's
img2img and inpainting (9-channel, and 4-channel with a mask) draw what the PyTorch pipeline draws and equal its
latents; TensorRT for RTX builds the 9-channel UNet and vae_encoder plans on this CPU."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.graph_names import EDIT_GRAPHS, GRAPHS
from ipadapter_instruct.engine.trt import tensorrt_unavailable
from ipadapter_instruct.export.onnx import export_onnx
from ipadapter_instruct.export.verify import verify
from test_export_controlnet import onnx_pipe
from test_export_plugin import export

NO_TRT = tensorrt_unavailable("rtx")
ARCH = "86"  # one arch keeps the plugin's cubin compile short
CROSS_ATTENTION_LAYERS = 4  # the tiny UNet's attn2 count
QUIET = dict(log=lambda *a: None)
ADAPTER = dict(instruct="use the style", scale=[0.8, 0.5], num_inference_steps=4, seed=[3, 4], height=64, width=48)


@pytest.fixture(scope="module")
def tiny_inpaint(tmp_path_factory):
    from ipadapter_instruct.engine.tiny import make_tiny
    return make_tiny(str(tmp_path_factory.mktemp("inpaint") / "weights"), inpaint=True)


@pytest.fixture(scope="module")
def inpaint_export(tiny_inpaint, tmp_path_factory):
    out = tmp_path_factory.mktemp("inpaint-onnx") / "plugin"
    export_onnx(tiny_inpaint["model"], tiny_inpaint["image_encoder"], tiny_inpaint["adapter"], str(out),
                device="cpu", **QUIET)
    return out


@pytest.fixture(scope="module")
def img2img_export(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("img2img-onnx") / "plugin"
    res = export("onnx", "--model", tiny["model"], "--image-encoder", tiny["image_encoder"], "--adapter",
                 tiny["adapter"], "--out", str(out), "--device", "cpu", "--img2img")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "vae_encoder.onnx" in res.stdout
    return out


def torch_pipe(weights):
    from ipadapter_instruct.engine import Pipeline
    pipe = Pipeline.from_pretrained(weights["model"], image_encoder=weights["image_encoder"],
                                    adapter=weights["adapter"], device="cpu", dtype="float32",
                                    attention_backend="reference")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_image(h, w, seed):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def mask(h, w, top, left):
    """White (repaint) from (top, left) to the bottom right, black (keep) elsewhere."""
    m = np.zeros((h, w), "uint8")
    m[top:, left:] = 255
    return Image.fromarray(m)


def test_an_inpainting_export_says_its_unet_channels_and_has_vae_encoder(inpaint_export):
    manifest = json.loads((inpaint_export / "manifest.json").read_text())
    assert manifest["kind"] == "text_to_image" and list(manifest["graphs"]) == list(EDIT_GRAPHS)
    unet, enc = manifest["graphs"]["unet"], manifest["graphs"]["vae_encoder"]
    assert unet["inputs"][0]["shape"] == ["batch", 9, "latent_height", "latent_width"]
    assert unet["channels"] == {"latent": [0, 4], "mask": [4, 5], "masked_photo_latent": [5, 9]}
    assert unet["plugin_nodes"] == CROSS_ATTENTION_LAYERS
    assert [(t["name"], t["shape"][1]) for t in enc["outputs"]] == [("photo_latent", 4), ("photo_logvar", 4)]
    assert manifest["vae_scaling_factor"] == pytest.approx(0.18215)


def test_verify_covers_the_9_channel_unet_and_both_encoder_outputs(inpaint_export):
    rows = verify(str(inpaint_export), batch=2, height=40, width=48, graphs=["unet", "vae_encoder"], **QUIET)
    assert [r["graph"] for r in rows] == ["unet"] * 3 + ["vae_encoder"]
    assert all(r["ok"] and r["max_abs_diff"] < 1e-4 for r in rows)
    assert rows[0]["shape"] == [2, 4, 10, 12] and rows[-1]["outputs"] == 2


def test_inpainting_on_the_graphs_matches_the_engine(inpaint_export, tiny_inpaint):
    """Two requests with their own photos, masks and strengths (1.0: noise alone; 0.6: a later start, so a group of
    its own), each with the adapter: the same latents as the PyTorch pipeline."""
    photos = [random_image(64, 48, 0), random_image(64, 48, 1)]
    kw = dict(prompt=["a red house", "a blue boat"], image=random_image(40, 40, 2), init_image=photos,
              mask_image=[mask(64, 48, 16, 8), mask(64, 48, 0, 24)], strength=[1.0, 0.6], **ADAPTER)
    want = torch_pipe(tiny_inpaint)(**kw, output_type="latent")
    got = onnx_pipe(inpaint_export)(**kw, output_type="latent")
    assert got.shape == want.shape == (2, 4, 16, 12) and (got - want).abs().max() < 1e-4


def test_img2img_and_4_channel_inpainting_on_the_graphs_match_the_engine(img2img_export, tiny):
    """img2img (photo sampled from the encoder's moments with the request's generator) and inpainting on the
    4-channel UNet (the kept region re-imposed each step) in one call, then img2img at another strength with an
    ancestral scheduler (its later draws follow the same generator)."""
    torch_side, graphs = torch_pipe(tiny), onnx_pipe(img2img_export)
    photo = random_image(64, 48, 0)
    kw = dict(prompt=["a red house", "a blue boat"], image=random_image(40, 40, 2), init_image=photo,
              mask_image=[None, mask(64, 48, 16, 8)], strength=0.5, **ADAPTER)
    want, got = torch_side(**kw, output_type="latent"), graphs(**kw, output_type="latent")
    assert got.shape == want.shape == (2, 4, 16, 12) and (got - want).abs().max() < 1e-4
    kw = dict(kw, mask_image=None, strength=0.8, scheduler="euler_a", prompt="a red house", scale=0.8, seed=5)
    del kw["height"], kw["width"]  # img2img's default size: the photo's
    want, got = torch_side(**kw, output_type="latent"), graphs(**kw, output_type="latent")
    assert got.shape == want.shape == (1, 4, 16, 12) and (got - want).abs().max() < 1e-4
    assert [im.size for im in graphs(**kw)] == [(48, 64)]


def test_img2img_takes_the_photos_size_on_the_graphs_grid(img2img_export, tiny):
    """A 70 x 54 photo: the PyTorch pipeline's output is 68 x 52 (the VAE's 4 px grid), which the exported UNet
    cannot take (its latent halves once: 8 px); the exported runtime rounds down to its grid instead."""
    kw = dict(prompt="a red house", image=random_image(40, 40, 2), instruct="use the style",
              init_image=random_image(70, 54, 0), strength=0.5, num_inference_steps=2, seed=1)
    assert torch_pipe(tiny)(**kw)[0].size == (52, 68)
    assert onnx_pipe(img2img_export)(**kw)[0].size == (48, 64)


def test_export_run_inpaints_from_the_command_line(inpaint_export, tmp_path):
    random_image(64, 48, 0).save(tmp_path / "photo.png")
    mask(64, 48, 16, 8).save(tmp_path / "mask.png")
    random_image(40, 40, 2).save(tmp_path / "cond.png")
    common = ["run", str(inpaint_export), "--prompt", "a red house", "--image", str(tmp_path / "cond.png"),
              "--instruct", "use the style", "--steps", "2", "--seed", "1", "--init-image", str(tmp_path / "photo.png")]
    res = export(*common, "--mask", str(tmp_path / "mask.png"), "--strength", "0.9", "--out", str(tmp_path / "x.png"))
    assert res.returncode == 0, res.stderr[-2000:]
    with Image.open(tmp_path / "x.png") as im:
        assert im.size == (64, 64)  # inpainting: the model's native size, as diffusers
    res = export(*common, "--out", str(tmp_path / "y.png"))
    assert res.returncode == 2 and not (tmp_path / "y.png").exists()
    assert res.stderr.strip().splitlines() == [
        "python -m export run: error: mask_image is required: this is an inpainting model (its UNet reads a mask); "
        "white in the mask is repainted, black kept"]


def without_vae_encoder(folder, dest):
    """A copy of an export folder whose manifest lists no vae_encoder (as an export without --img2img)."""
    shutil.copytree(folder, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    del manifest["graphs"]["vae_encoder"]
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_a_photo_without_vae_encoder_is_one_line_before_any_work(img2img_export, inpaint_export, tmp_path):
    pipe = onnx_pipe(without_vae_encoder(img2img_export, tmp_path / "t2i"))
    assert sorted(pipe.graphs) == sorted(GRAPHS)
    with pytest.raises(EngineError, match=r"has no vae_encoder graph: init_image= is encoded by it; export the "
                                          r"model again with --img2img"):
        pipe("a red house", random_image(40, 40, 2), "use the style", init_image=random_image(64, 48, 0),
             num_inference_steps=2)
    built = onnx_pipe(img2img_export)
    del built.graphs["vae_encoder"]  # as a TensorRT folder whose manifest lists it but that has no plan for it
    with pytest.raises(EngineError, match=r"build its plan: `python -m export trt ONNX_DIR --out .*plugin --graphs "
                                          r"vae_encoder`"):
        built("a red house", random_image(40, 40, 2), "use the style", init_image=random_image(64, 48, 0))
    with pytest.raises(EngineError, match=r"an inpainting model \(9 UNet input channels\).*lacks vae_encoder"):
        onnx_pipe(without_vae_encoder(inpaint_export, tmp_path / "inpaint"))


def test_vae_encoder_is_exported_for_photos_only(tiny):
    with pytest.raises(EngineError, match="vae_encoder for a text-to-image model.*--img2img"):
        export_onnx(tiny["model"], tiny["image_encoder"], tiny["adapter"], "unused", graphs=("vae_encoder",), **QUIET)


def test_the_tensorrt_runtime_loads_vae_encoder_where_it_was_built(inpaint_export):
    from ipadapter_instruct.engine.trt.runtime import plan_names

    manifest = json.loads((inpaint_export / "manifest.json").read_text())
    plans = {"graphs": {g: {} for g in EDIT_GRAPHS}}
    assert plan_names(manifest, plans, "out") == list(EDIT_GRAPHS)
    del plans["graphs"]["vae_encoder"]
    with pytest.raises(EngineError, match="out has no plan for vae_encoder"):
        plan_names(manifest, plans, "out")  # the 9-channel UNet cannot run without it
    manifest["graphs"]["unet"]["inputs"][0]["shape"][1] = 4
    assert plan_names(manifest, plans, "out") == list(GRAPHS)  # text-to-image: img2img refused at the call


@pytest.mark.skipif(NO_TRT is not None, reason=f"TensorRT does not import: {NO_TRT}")
def test_trt_builds_the_9_channel_unet_and_vae_encoder(inpaint_export, tmp_path):
    dest = tmp_path / "plans"
    res = export("trt", str(inpaint_export), "--out", str(dest), "--arch", ARCH, "--trt", "rtx",
                 "--graphs", "unet,vae_encoder")
    assert res.returncode == 0, res.stderr[-3000:]
    index = json.loads((dest / "engines.json").read_text())
    assert sorted(index["graphs"]) == ["unet", "vae_encoder"]
    unet = index["graphs"]["unet"]
    assert [dims[1] for dims in unet["profile"]["sample"]] == [9, 9, 9]
    assert unet["plugin_layers"] == CROSS_ATTENTION_LAYERS
    assert (dest / "vae_encoder.plan").stat().st_size == index["graphs"]["vae_encoder"]["bytes"] > 0
