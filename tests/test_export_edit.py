"""The InstructPix2Pix export (`python -m export onnx` on `make_tiny(DIR, edit=True)`): the manifest's kind, the
8-channel UNet and the vae_encoder graph; `verify` of both against the engine's PyTorch path at the default and at
other sizes; OnnxEditPipeline's latents against engine.EditPipeline's; `python -m export trt` building every graph
(vae_encoder among them) on this CPU with TensorRT for RTX."""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.trt import tensorrt_unavailable
from ipadapter_instruct.export.onnx import EDIT_GRAPHS, export_onnx
from ipadapter_instruct.export.verify import verify
from test_export_plugin import export

NO_TRT = tensorrt_unavailable("rtx")
ARCH = "86"  # one arch keeps the plugin's cubin compile short
CROSS_ATTENTION_LAYERS = 4  # the tiny UNet's attn2 count
QUIET = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def edit_export(tiny_edit, tmp_path_factory):
    out = tmp_path_factory.mktemp("edit-onnx") / "plugin"
    res = export("onnx", "--model", tiny_edit["model"], "--image-encoder", tiny_edit["image_encoder"],
                 "--adapter", tiny_edit["adapter"], "--out", str(out), "--device", "cpu")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "vae_encoder.onnx" in res.stdout
    return out


@pytest.fixture(scope="module")
def edit_pipe(tiny_edit):
    from ipadapter_instruct.engine import EditPipeline
    pipe = EditPipeline.from_pretrained(tiny_edit["model"], image_encoder=tiny_edit["image_encoder"],
                                        adapter=tiny_edit["adapter"], device="cpu", dtype="float32",
                                        attention_backend="reference")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_image(h, w, seed):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def test_manifest_says_edit_and_what_the_unet_channels_are(edit_export):
    manifest = json.loads((edit_export / "manifest.json").read_text())
    assert manifest["kind"] == "edit" and list(manifest["graphs"]) == list(EDIT_GRAPHS)
    assert sorted(os.listdir(edit_export)) == sorted([f"{g}.onnx" for g in EDIT_GRAPHS] + ["manifest.json"])
    unet, enc, dec = (manifest["graphs"][g] for g in ("unet", "vae_encoder", "vae_decoder"))
    assert unet["inputs"][0]["shape"] == ["batch", 8, "latent_height", "latent_width"]
    assert unet["outputs"][0]["shape"] == ["batch", 4, "latent_height", "latent_width"]
    assert unet["channels"] == {"latent": [0, 4], "photo_latent": [4, 8]}
    assert unet["plugin_nodes"] == CROSS_ATTENTION_LAYERS and "ip_scale" in [t["name"] for t in unet["inputs"]]
    assert [t["name"] for t in enc["inputs"]] == ["pixels"] and enc["outputs"][0]["shape"][1] == 4
    f = manifest["vae_scale_factor"]
    for level in ("min", "opt", "max"):  # the encoder's pixel range is the decoder's latent range, in pixels
        latent = dec["profiles"][level]["latent"]
        assert enc["profiles"][level]["pixels"] == [latent[0], 3, latent[2] * f, latent[3] * f]
    assert enc["dynamic_axes"]["pixels"] == {"0": "batch", "2": "image_height", "3": "image_width"}


def test_verify_covers_vae_encoder_and_the_8_channel_unet(edit_export):
    res = export("verify", str(edit_export))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "8/8 checks within tolerance" in res.stdout and "vae_encoder: max" in res.stdout
    rows = verify(str(edit_export), batch=3, height=72, width=48, graphs=["unet", "vae_encoder"], **QUIET)
    assert [r["graph"] for r in rows] == ["unet"] * 3 + ["vae_encoder"]
    assert all(r["ok"] and r["max_abs_diff"] < 1e-4 for r in rows)
    assert rows[0]["shape"] == rows[-1]["shape"] == [3, 4, 18, 12]


def test_vae_encoder_graph_encodes_photos_as_the_engine(edit_export, edit_pipe):
    from ipadapter_instruct.export.onnx_runtime import OnnxEditPipeline

    pipe = OnnxEditPipeline.from_export(str(edit_export))
    photos = [SimpleNamespace(photo=random_image(72, 56, s)) for s in (0, 1, 0)]  # a shared photo encoded once
    want, got = edit_pipe.encode_photos(photos, 72, 56), pipe.encode_photos(photos, 72, 56)
    assert got.shape == want.shape == (3, 4, 18, 14) and (got - want).abs().max() < 1e-4


def test_edits_from_the_graphs_match_the_engine(edit_export, edit_pipe):
    from ipadapter_instruct.export.onnx_runtime import OnnxEditPipeline

    pipe = OnnxEditPipeline.from_export(str(edit_export))
    pipe.set_progress_bar_config(disable=True)
    photo = random_image(72, 56, 0)  # 18 x 14 latents: the traced UNet takes even latent sizes
    kw = dict(prompt=["make it winter", "add snow"], image=[photo, random_image(72, 56, 1)],
              image_guidance_scale=[1.5, 1.2], guidance_scale=[7.5, 1.0], adapter_image=random_image(40, 40, 2),
              instruct="use the style", scale=[0.8, 0.0], num_inference_steps=3, seed=[3, 4], scheduler="ddim")
    want = edit_pipe(**kw, output_type="latent")
    got = pipe(**kw, output_type="latent")
    assert got.shape == want.shape == (2, 4, 18, 14) and (got - want).abs().max() < 1e-4
    assert [im.size for im in pipe(**kw)] == [(56, 72)] * 2
    odd = dict(kw, image=[random_image(70, 54, 0)] * 2)  # 68 x 52 px: 17 x 13 latents, which the graph cannot take
    with pytest.raises(EngineError, match=r"multiples of 8 px \(its latent halves 1 times\); got 68x52"):
        pipe(**odd)
    assert edit_pipe(**odd, output_type="latent").shape == (2, 4, 17, 13)  # the PyTorch UNet takes them


def test_runtimes_and_graphs_follow_the_model_kind(edit_export, tiny):
    from ipadapter_instruct.export.onnx_runtime import OnnxPipeline

    with pytest.raises(EngineError, match="InstructPix2Pix export.*OnnxEditPipeline"):
        OnnxPipeline.from_export(str(edit_export))
    with pytest.raises(EngineError, match="vae_encoder for a text-to-image model"):
        export_onnx(tiny["model"], tiny["image_encoder"], tiny["adapter"], "unused", graphs=("vae_encoder",), **QUIET)


def test_the_tensorrt_backend_names_an_edit_export(edit_export, tiny_edit):
    from ipadapter_instruct.engine import EditPipeline, Pipeline

    with pytest.raises(EngineError, match="InstructPix2Pix export: editing runs on the PyTorch backend"):
        Pipeline.from_pretrained(tiny_edit["model"], backend="tensorrt", engines=str(edit_export))
    with pytest.raises(EngineError, match="OnnxEditPipeline; a TensorRT edit runtime is not built yet"):
        EditPipeline.from_pretrained(tiny_edit["model"], backend="tensorrt", engines=str(edit_export))


@pytest.mark.skipif(NO_TRT is not None, reason=f"TensorRT does not import: {NO_TRT}")
def test_trt_builds_every_edit_graph(edit_export, tmp_path):
    dest = tmp_path / "plans"
    res = export("trt", str(edit_export), "--out", str(dest), "--arch", ARCH, "--trt", "rtx")
    assert res.returncode == 0, res.stderr[-3000:]
    index = json.loads((dest / "engines.json").read_text())
    assert sorted(index["graphs"]) == sorted(EDIT_GRAPHS) and index["dtype"] == "float32"
    unet = index["graphs"]["unet"]
    assert [dims[1] for dims in unet["profile"]["sample"]] == [8, 8, 8]
    assert unet["plugin_layers"] == CROSS_ATTENTION_LAYERS
    assert (dest / "vae_encoder.plan").stat().st_size == index["graphs"]["vae_encoder"]["bytes"] > 0
    assert "vae_encoder: vae_encoder.plan" in res.stdout
