"""`python -m export onnx` on an SDXL model (tiny random SDXL weights): text_encoder (last and penultimate hidden
states), text_encoder_2 (penultimate hidden state and pooled projection), image_encoder, projector, a UNet that
takes the added conditioning per row (text_embeds, time_ids) beside the adapter tokens and per-row scales, and
vae_decoder; every graph verified under ONNX Runtime against the engine's PyTorch modules, in both attention
forms, IPAdapter-Instruct and IP-Adapter+; running an SDXL export is refused with one line."""
import json
import os

import pytest
import torch

from engine.errors import EngineError

QUIET = dict(log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from engine.tiny import make_tiny_sdxl
    return make_tiny_sdxl(str(tmp_path_factory.mktemp("sdxl-export") / "tiny"))


@pytest.mark.parametrize("attention, adapter", [("plugin", "instruct"), ("onnx", "instruct"), ("onnx", "adapter")],
                         ids=["plugin-instruct", "onnx-instruct", "onnx-plus"])
def test_sdxl_export_verifies_under_onnx_runtime(sdxl, tmp_path, attention, adapter):
    from export.onnx import export_onnx
    from export.verify import verify

    out = tmp_path / "onnx"
    export_onnx(sdxl["model"], sdxl["image_encoder"], sdxl[adapter], str(out), attention=attention, **QUIET)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "sdxl" and manifest["tokenizer_2"]["max_length"] == 77
    graphs = manifest["graphs"]
    assert set(graphs) == {"text_encoder", "text_encoder_2", "image_encoder", "projector", "unet", "vae_decoder"}
    assert [t["name"] for t in graphs["unet"]["inputs"]][-2:] == ["text_embeds", "time_ids"]
    assert [t["name"] for t in graphs["text_encoder_2"]["outputs"]] == ["penultimate", "text_embeds"]
    assert [t["name"] for t in graphs["text_encoder"]["outputs"]] == ["text_tokens", "penultimate"]
    assert graphs["unet"]["inputs"][2]["shape"][-1] == 64  # both encoders' widths side by side
    if attention == "plugin":
        assert graphs["unet"]["plugin_nodes"] > 0
    rows = verify(str(out), batch=2, **QUIET)
    assert {r["graph"] for r in rows} == set(graphs)
    bad = [r for r in rows if not r["ok"] or r["max_abs_diff"] > 1e-4]
    assert not bad, bad
    unet = [r for r in rows if r["graph"] == "unet"]
    assert len(unet) == 3 and all(r["ref_max"] > 0.1 for r in unet)  # three scale cases, non-trivial outputs


def test_running_an_sdxl_export_is_refused(sdxl, tmp_path):
    from export.onnx import export_onnx
    from export.runtime import OnnxPipeline

    out = tmp_path / "onnx"
    export_onnx(sdxl["model"], sdxl["image_encoder"], sdxl["instruct"], str(out), attention="onnx",
                graphs=["projector"], **QUIET)
    with pytest.raises(EngineError, match="is an SDXL export: running SDXL graphs"):
        OnnxPipeline.from_export(str(out))


def test_tensorrt_builds_every_sdxl_graph(sdxl, tmp_path):
    """`python -m export trt` on the SDXL export (plugin form): every graph builds, text_encoder_2 included, and the
    UNet engine takes the added conditioning with its profile."""
    from engine.trt import tensorrt_unavailable
    why = tensorrt_unavailable()
    if why is not None:
        pytest.skip(f"TensorRT does not import: {why}")
    from test_export_plugin import export
    onnx_dir, plans = tmp_path / "onnx", tmp_path / "plans"
    res = export("onnx", "--model", sdxl["model"], "--image-encoder", sdxl["image_encoder"], "--adapter",
                 sdxl["instruct"], "--out", str(onnx_dir), "--device", "cpu")
    assert res.returncode == 0, res.stderr[-2000:]
    res = export("trt", str(onnx_dir), "--out", str(plans), "--arch", "86")
    assert res.returncode == 0, res.stderr[-3000:]
    index = json.loads((plans / "engines.json").read_text())
    assert set(index["graphs"]) == {"text_encoder", "text_encoder_2", "image_encoder", "projector", "unet",
                                    "vae_decoder"}
    unet = index["graphs"]["unet"]
    assert {"text_embeds", "time_ids"} <= set(unet["inputs"]) and unet["profile"]["time_ids"] == [[1, 6], [2, 6],
                                                                                                   [16, 6]]
    assert unet["plugin_layers"] > 0
