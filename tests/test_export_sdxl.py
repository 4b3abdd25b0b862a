"""`python -m export onnx` on an SDXL model (tiny random SDXL weights): text_encoder (last and penultimate hidden
states), text_encoder_2 (penultimate hidden state and pooled projection), image_encoder, projector, a UNet that
takes the added conditioning per row (text_embeds, time_ids) beside the adapter tokens and per-row scales, and
vae_decoder; every graph verified under ONNX Runtime against the engine's PyTorch modules, in both attention
forms, IPAdapter-Instruct and IP-Adapter+. The export runs: ONNX Runtime generation (OnnxSDXLPipeline, `python -m
export run`, the server) gives the PyTorch pipeline's latents; TensorRT's plans build here and, on a GPU, match."""
import json
import os

import pytest
import torch

from conftest import gpu
from ipadapter_instruct.engine.errors import EngineError

QUIET = dict(log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from ipadapter_instruct.engine.tiny import make_tiny_sdxl
    return make_tiny_sdxl(str(tmp_path_factory.mktemp("sdxl-export") / "tiny"))


@pytest.fixture(scope="module")
def sdxl_exports(sdxl, tmp_path_factory):
    """(attention form, adapter) -> a whole SDXL export of the tiny weights, made once for the tests below."""
    from ipadapter_instruct.export.onnx import export_onnx

    made = {}

    def get(attention: str, adapter: str):
        if (attention, adapter) not in made:
            out = tmp_path_factory.mktemp(f"sdxl-{attention}-{adapter}") / "onnx"
            export_onnx(sdxl["model"], sdxl["image_encoder"], sdxl[adapter], str(out), attention=attention, **QUIET)
            made[attention, adapter] = out
        return made[attention, adapter]
    return get


@pytest.mark.parametrize("attention, adapter", [("plugin", "instruct"), ("onnx", "instruct"), ("onnx", "adapter")],
                         ids=["plugin-instruct", "onnx-instruct", "onnx-plus"])
def test_sdxl_export_verifies_under_onnx_runtime(sdxl_exports, attention, adapter):
    from ipadapter_instruct.export.verify import verify

    out = sdxl_exports(attention, adapter)
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


def sdxl_kwargs(cond_image, adapter: str, **kw) -> dict:
    args = dict(prompt=["a red house", "a cat"], image=cond_image, scale=[0.8, 0.3], num_inference_steps=3,
                seed=[0, 1], original_size=(96, 80), crops_coords_top_left=(4, 0), output_type="latent")
    if adapter == "instruct":
        args["instruct"] = ["use the style", "take the object"]
    return {**args, **kw}


@pytest.mark.parametrize("attention, adapter", [("plugin", "instruct"), ("onnx", "adapter")],
                         ids=["plugin-instruct", "onnx-plus"])
def test_generation_from_the_sdxl_graphs_matches_the_engine(sdxl, sdxl_exports, cond_image, attention, adapter):
    """The six graphs under ONNX Runtime with engine/sdxl.py's maths around them (two-encoder tokens, pooled
    embeddings and time ids per row, the Instruct projector's CLIP-L text): the PyTorch pipeline's latents."""
    from ipadapter_instruct.engine import Pipeline
    from ipadapter_instruct.export.onnx_runtime import OnnxPipeline, OnnxSDXLPipeline

    ref = Pipeline.from_pretrained(sdxl["model"], image_encoder=sdxl["image_encoder"], adapter=sdxl[adapter])
    pipe = OnnxPipeline.from_export(str(sdxl_exports(attention, adapter)))
    assert isinstance(pipe, OnnxSDXLPipeline) and pipe.kind == "sdxl"
    for p in (ref, pipe):
        p.set_progress_bar_config(disable=True)
    modes = ("auto", "simple") if adapter == "instruct" else ("auto",)
    for mode in modes:
        kw = sdxl_kwargs(cond_image, adapter, guidance_mode=mode)
        want, got = ref(**kw), pipe(**kw)
        assert got.shape == want.shape == (2, 4, 16, 16)
        assert (got - want).abs().max() < 1e-4, (mode, (got - want).abs().max())
    # the size conditioning reaches the UNet graph: another original size moves the latents, on both sides alike
    kw = sdxl_kwargs(cond_image, adapter, original_size=(64, 64), crops_coords_top_left=(0, 0))
    other = pipe(**kw)
    assert (other - got).abs().max() > 1e-2 and (other - ref(**kw)).abs().max() < 1e-4
    images = pipe(**{**kw, "output_type": "pil"})
    assert len(images) == 2 and images[0].size == (64, 64)


def test_an_sdxl_export_opens_only_as_sdxl_and_whole(sdxl, sdxl_exports, tmp_path):
    from ipadapter_instruct.export.onnx import export_onnx
    from ipadapter_instruct.export.onnx_runtime import OnnxPipeline, OnnxSDXLPipeline

    folder = str(sdxl_exports("onnx", "adapter"))
    with pytest.raises(EngineError, match="is an SDXL export .*run it with OnnxSDXLPipeline, not OnnxPipeline"):
        OnnxPipeline(folder)
    part = tmp_path / "part"
    export_onnx(sdxl["model"], sdxl["image_encoder"], sdxl["instruct"], str(part), attention="onnx",
                graphs=["projector"], **QUIET)
    with pytest.raises(EngineError, match="lacks text_encoder, image_encoder, unet, vae_decoder, text_encoder_2: "
                                          "generation needs all 6 graphs"):
        OnnxSDXLPipeline.from_export(str(part))


def test_export_run_and_the_server_take_an_sdxl_export(sdxl_exports, cond_image, tmp_path):
    """`python -m export run` with the size flags, and the server around the SDXL export: its answer is the
    pipeline's own image, and the size conditioning is a request field."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    from ipadapter_instruct.engine.server.config import ServerConfig
    from ipadapter_instruct.export.__main__ import main
    from ipadapter_instruct.export.onnx_runtime import OnnxPipeline
    from server_utils import InProcessServer, decode_png, png_base64

    folder = sdxl_exports("plugin", "instruct")
    cond_image.save(tmp_path / "cond.png")
    argv = ["run", str(folder), "--prompt", "a cat", "--image", str(tmp_path / "cond.png"), "--instruct",
            "use the style", "--steps", "2", "--original-size", "96,96", "--out", str(tmp_path / "out.png")]
    assert main(argv) == 0 and Image.open(tmp_path / "out.png").size == (64, 64)

    pipe = OnnxPipeline.from_export(str(folder))
    server = InProcessServer(ServerConfig(max_wait_ms=0), pipe)
    try:
        req = dict(prompt="a red house", image=png_base64(cond_image), instruct="use the style of this image",
                   num_inference_steps=2, seed=4, scale=0.6, original_size=[96, 80])
        r = server.request("POST", "/v1/generate", json=req)
        assert r.status_code == 200, r.text
        want = pipe(prompt="a red house", image=cond_image, instruct="use the style of this image",
                    num_inference_steps=2, seed=4, scale=0.6, original_size=(96, 80))[0]
        want = Image.open(io.BytesIO(base64.b64decode(png_base64(want)))).convert("RGB")
        assert np.abs(np.asarray(decode_png(r.json()["images"][0]), int) - np.asarray(want, int)).max() <= 1
    finally:
        server.close()


def test_tensorrt_builds_every_sdxl_graph(sdxl, tmp_path):
    """`python -m export trt` on the SDXL export (plugin form): every graph builds, text_encoder_2 included, and the
    UNet engine takes the added conditioning with its profile."""
    from ipadapter_instruct.engine.trt import tensorrt_unavailable
    why = tensorrt_unavailable("rtx")
    if why is not None:
        pytest.skip(f"TensorRT for RTX does not import: {why}")
    from test_export_plugin import export
    onnx_dir, plans = tmp_path / "onnx", tmp_path / "plans"
    res = export("onnx", "--model", sdxl["model"], "--image-encoder", sdxl["image_encoder"], "--adapter",
                 sdxl["instruct"], "--out", str(onnx_dir), "--device", "cpu")
    assert res.returncode == 0, res.stderr[-2000:]
    res = export("trt", str(onnx_dir), "--out", str(plans), "--arch", "86", "--trt", "rtx")
    assert res.returncode == 0, res.stderr[-3000:]
    index = json.loads((plans / "engines.json").read_text())
    assert set(index["graphs"]) == {"text_encoder", "text_encoder_2", "image_encoder", "projector", "unet",
                                    "vae_decoder"}
    unet = index["graphs"]["unet"]
    assert {"text_embeds", "time_ids"} <= set(unet["inputs"]) and unet["profile"]["time_ids"] == [[1, 6], [2, 6],
                                                                                                   [16, 6]]
    assert unet["plugin_layers"] > 0


@gpu
def test_tensorrt_sdxl_latents_match_the_pytorch_path(sdxl, sdxl_exports, cond_image, tmp_path):
    """The SDXL plans (fp32, plugin attention, built for this GPU) with the engine's SDXL loop around them: the
    PyTorch pipeline's latents, also when the UNet engine replays from CUDA graphs."""
    from ipadapter_instruct.engine import Pipeline
    from ipadapter_instruct.engine.trt.runtime import TensorRTSDXLPipeline
    from ipadapter_instruct.engine.trt.support import runnable_here
    from test_export_plugin import export

    ok, why = runnable_here()  # a TensorRT that can run plans on this GPU, or why none can
    if not ok:
        pytest.skip(why)
    major, minor = torch.cuda.get_device_capability()
    plans = tmp_path / "plans"
    res = export("trt", str(sdxl_exports("plugin", "instruct")), "--out", str(plans), "--arch", f"{major}{minor}",
                 "--no-tf32")
    assert res.returncode == 0, res.stderr[-3000:]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    ref = Pipeline.from_pretrained(sdxl["model"], image_encoder=sdxl["image_encoder"], adapter=sdxl["instruct"],
                                   device="cuda", dtype="float32", attention_backend="sdpa")
    pipe = Pipeline.from_pretrained(sdxl["model"], backend="tensorrt", engines=str(plans))
    assert isinstance(pipe, TensorRTSDXLPipeline)
    kw = sdxl_kwargs(cond_image, "instruct")
    want, got = ref(**kw), pipe(**kw)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    pipe.enable_cuda_graphs()
    for _ in range(2):  # the first call captures, the second replays
        torch.testing.assert_close(pipe(**kw), got, atol=1e-5, rtol=1e-5)


def test_sdxl_img2img_and_inpainting_from_the_graphs_match_the_engine(sdxl, cond_image, tmp_path):
    """An SDXL export made with --img2img (vae_encoder's moments): img2img and 4-channel inpainting under ONNX
    Runtime give the PyTorch SDXL pipeline's latents (its photo latent drawn from the same generator)."""
    import numpy as np
    from PIL import Image

    from ipadapter_instruct.engine import Pipeline
    from ipadapter_instruct.export.onnx import export_onnx
    from ipadapter_instruct.export.onnx_runtime import OnnxPipeline

    out = tmp_path / "onnx"
    export_onnx(sdxl["model"], sdxl["image_encoder"], sdxl["instruct"], str(out), img2img=True, **QUIET)
    ref = Pipeline.from_pretrained(sdxl["model"], image_encoder=sdxl["image_encoder"], adapter=sdxl["instruct"])
    pipe = OnnxPipeline.from_export(str(out))
    for p in (ref, pipe):
        p.set_progress_bar_config(disable=True)
    photo = Image.fromarray((np.random.RandomState(4).rand(64, 64, 3) * 255).astype("uint8"))
    m = np.zeros((64, 64), "uint8")
    m[16:48, 8:56] = 255
    for extra in (dict(strength=0.6), dict(mask_image=Image.fromarray(m), strength=0.8)):
        kw = dict(sdxl_kwargs(cond_image, "instruct"), init_image=photo, **extra)
        want, got = ref(**kw), pipe(**kw)
        assert got.shape == want.shape
        assert (got - want).abs().max() < 1e-4, (extra, (got - want).abs().max())
        assert (got - pipe(**sdxl_kwargs(cond_image, "instruct"))).abs().max() > 1e-3  # the photo counts
