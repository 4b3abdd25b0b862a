"""Automatic1111's API shape (engine/server/a1111_api.py) on a real `python -m engine serve`, driven by A1111's own
Python client, `webuiapi`: txt2img with an IP-Adapter ControlNet unit and img2img give the native /v1/generate
images for the same request (within one grey level) and the seed in `info`; the listings; bad inputs answered 422
in A1111's error shape, naming A1111's field, while a valid request completes."""
import json
import re
import threading
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

from conftest import NEGATIVE, PROMPT
from server_utils import REPO, ServerProcess, decode_png, png_base64, tiny_args

DEFAULT_INSTRUCT = "use the style of this image"  # the server's --default-instruct here


@pytest.fixture(scope="module")
def server(tiny):
    with ServerProcess([*tiny_args(tiny), "--default-instruct", DEFAULT_INSTRUCT]) as srv:
        yield srv


@pytest.fixture(scope="module")
def api(server):
    url = urlsplit(server.url)
    return webuiapi.WebUIApi(host=url.hostname, port=url.port, sampler="DDIM")


@pytest.fixture(scope="module")
def photo():
    g = np.random.default_rng(3)
    return Image.fromarray(g.integers(0, 256, (64, 64, 3), dtype=np.uint8))


def native(server, **fields) -> Image.Image:
    r = httpx.post(server.url + "/v1/generate", json=fields, timeout=120)
    assert r.status_code == 200, r.text
    return decode_png(r.json()["images"][0])


def close(a, b) -> None:
    assert a.size == b.size
    assert np.abs(np.asarray(a.convert("RGB"), dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def adapter_unit(image, **kw):
    return webuiapi.ControlNetUnit(image=image, module="ip-adapter_clip_sd15", model="ip-adapter-instruct", **kw)


def test_txt2img_with_an_ip_adapter_unit_is_the_native_request(server, api, cond_image):
    r = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=5, steps=2, width=64, height=64, cfg_scale=6.0,
                    controlnet_units=[adapter_unit(cond_image, weight=0.8)], alwayson_scripts={})
    want = native(server, prompt=PROMPT, negative_prompt=NEGATIVE, ip_adapter_image=png_base64(cond_image),
                  instruct=DEFAULT_INSTRUCT, scale=0.8, seed=5, num_inference_steps=2, width=64, height=64,
                  guidance_scale=6.0, scheduler="ddim")
    close(r.image, want)
    assert r.info["seed"] == 5 and r.info["all_seeds"] == [5]
    assert (r.info["sampler_name"], r.info["steps"], r.info["width"], r.info["height"]) == ("DDIM", 2, 64, 64)
    assert r.parameters["prompt"] == PROMPT and r.parameters["seed"] == 5
    assert "Instruct: use the style of this image" in r.image.info["parameters"]


def test_a_unit_instruct_key_and_step_range_and_a_batch(server, cond_image):
    unit = {"image": png_base64(cond_image), "module": "none", "model": "ip-adapter_sd15 [c2a7e2d4]",
            "weight": 0.6, "guidance_start": 0.5, "instruct": "copy the face from this image"}
    body = {"prompt": PROMPT, "seed": 9, "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler a",
            "batch_size": 2, "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    r = httpx.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["all_seeds"] == [9, 10] and info["sampler_name"] == "Euler a"
    want = httpx.post(server.url + "/v1/generate", timeout=120, json=dict(
        prompt=PROMPT, ip_adapter_image=unit["image"], instruct=unit["instruct"], scale=0.6, adapter_start=0.5,
        seed=9, num_inference_steps=2, width=64, height=64, scheduler="euler_a", num_images_per_prompt=2)).json()
    for got, exp in zip(r.json()["images"], want["images"]):
        close(decode_png(got), decode_png(exp))


def test_img2img_is_the_native_img2img(server, api, cond_image, photo):
    r = api.img2img(images=[photo], denoising_strength=0.5, prompt=PROMPT, seed=7, steps=2, width=64, height=64,
                    cfg_scale=6.0, controlnet_units=[adapter_unit(cond_image, weight=0.8)], alwayson_scripts={})
    want = native(server, prompt=PROMPT, negative_prompt="", init_image=png_base64(photo), strength=0.5,
                  ip_adapter_image=png_base64(cond_image), instruct=DEFAULT_INSTRUCT, scale=0.8, seed=7,
                  num_inference_steps=2, width=64, height=64, guidance_scale=6.0, scheduler="ddim")
    close(r.image, want)
    assert r.info["seed"] == 7 and r.info["denoising_strength"] == 0.5
    assert r.parameters["init_images"] is None  # as A1111 answers: the request without its photo


def test_listings(server, api, tiny):
    names = {s["name"] for s in api.get_samplers()}
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "PLMS", "LCM"} <= names
    models = api.get_sd_models()
    assert len(models) == 1 and models[0]["model_name"] == models[0]["title"] == "model"  # the tiny folder's name
    options = api.get_options()
    assert options["sd_model_checkpoint"] == "model" and options["default_instruct"] == DEFAULT_INSTRUCT
    r = httpx.post(server.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "other"})
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed" and "read-only" in r.json()["detail"]


def refusal(call, field: str, status: int = 422) -> dict:
    with pytest.raises(RuntimeError) as e:
        call()
    code, text = e.value.args
    body = json.loads(text)
    assert code == status and body["field"] == field and field in body["detail"], body
    assert {"error", "detail", "body", "errors"} <= set(body)
    return body


def test_bad_inputs_are_422_naming_the_field_while_a_valid_request_completes(server, api, cond_image):
    out = {}
    valid = dict(prompt=PROMPT, seed=3, steps=40, width=64, height=64, alwayson_scripts={},
                 controlnet_units=[adapter_unit(cond_image)])
    t = threading.Thread(target=lambda: out.update(r=api.txt2img(**valid)))
    t.start()
    small = dict(prompt=PROMPT, seed=3, steps=2, width=64, height=64)
    unit = [adapter_unit(cond_image)]
    refusal(lambda: api.txt2img(**small, sampler_name="Heun++", controlnet_units=unit, alwayson_scripts={}),
            "sampler_name")
    canny = webuiapi.ControlNetUnit(image=cond_image, model="control_v11p_sd15_canny [d14c016b]")
    body = refusal(lambda: api.txt2img(**small, controlnet_units=[*unit, canny], alwayson_scripts={}),
                   "alwayson_scripts.controlnet.args[1].model")
    assert "control_v11p_sd15_canny" in body["detail"] and "none" in body["detail"]
    refusal(lambda: api.txt2img(**small, alwayson_scripts={}), "alwayson_scripts.controlnet.args")  # no unit
    refusal(lambda: api.txt2img(**{**small, "steps": 0}, controlnet_units=unit, alwayson_scripts={}), "steps")
    refusal(lambda: api.txt2img(**small, enable_hr=True, controlnet_units=unit, alwayson_scripts={}), "enable_hr")
    refusal(lambda: api.img2img(images=[cond_image, cond_image], **small, controlnet_units=unit,
                                alwayson_scripts={}), "init_images")
    refusal(lambda: api.txt2img(**small, controlnet_units=[adapter_unit(cond_image, weight=float("1e9"))],
                                alwayson_scripts={}), "alwayson_scripts.controlnet.args[0].weight")
    t.join(120)
    assert out["r"].info["seed"] == 3 and out["r"].image.size == (64, 64)


def test_disabled_units_are_skipped(server, api, cond_image):
    off = webuiapi.ControlNetUnit(image=cond_image, model="control_v11p_sd15_canny", enabled=False)
    r = api.txt2img(prompt=PROMPT, seed=4, steps=2, width=64, height=64, alwayson_scripts={},
                    controlnet_units=[off, adapter_unit(cond_image, weight=0.8)])
    assert r.info["seed"] == 4


def test_the_docs_webuiapi_example_runs(server, cond_image, tmp_path, monkeypatch):
    """docs/server.md's webuiapi block (tests/test_docs.py lists it as run here), at 2 steps and 64 px."""
    text = (Path(REPO) / "docs" / "server.md").read_text()
    code = next(b for b in re.findall(r"^```python\n(.*?)^```", text, re.S | re.M) if "webuiapi.WebUIApi(" in b)
    port = urlsplit(server.url).port
    code = code.replace("port=8000", f"port={port}").replace("steps=30", "steps=2").replace("512", "64")
    monkeypatch.chdir(tmp_path)
    cond_image.save("style.png")
    exec(compile(code, "docs/server.md (webuiapi block)", "exec"), {})
    with Image.open("lighthouse.png") as im:
        assert im.size == (64, 64)


@pytest.fixture(scope="module")
def cn_server(tiny, tmp_path_factory):
    """Text to image with a ControlNet (its folder's name: "canny-tiny"), calls held 400 ms for company."""
    from diffusers import UNet2DConditionModel

    from ipadapter_instruct.engine.tiny_parts import tiny_controlnet
    folder = tmp_path_factory.mktemp("a1111-cn") / "canny-tiny"
    tiny_controlnet(str(folder), UNet2DConditionModel.from_pretrained(tiny["model"], subfolder="unet"), 0)
    with ServerProcess(["--model", tiny["model"], "--controlnet", str(folder), "--max-wait-ms", "400"]) as srv:
        yield srv


def test_a_controlnet_unit_drives_the_loaded_net_and_batches_with_native_requests(cn_server, cond_image):
    url = urlsplit(cn_server.url)
    api = webuiapi.WebUIApi(host=url.hostname, port=url.port, sampler="Euler")
    unit = webuiapi.ControlNetUnit(image=cond_image, module="none", model="canny-tiny [0123abcd]", weight=0.7,
                                   guidance_end=0.5)
    body = dict(prompt=PROMPT, seed=2, num_inference_steps=2, width=64, height=64, guidance_scale=7.0,
                negative_prompt="", scheduler="euler", control_image=png_base64(cond_image),
                controlnet_conditioning_scale=0.7, control_guidance_end=0.5)
    out = {}
    t = threading.Thread(target=lambda: out.update(native=httpx.post(cn_server.url + "/v1/generate", json=body,
                                                                     timeout=120)))
    t.start()
    r = api.txt2img(prompt=PROMPT, seed=2, steps=2, width=64, height=64, controlnet_units=[unit], alwayson_scripts={})
    t.join(120)
    native_answer = out["native"].json()
    assert native_answer["timings"]["batch_requests"] == 2, "the native and the A1111 request did not share a call"
    close(r.image, decode_png(native_answer["images"][0]))
    other = webuiapi.ControlNetUnit(image=cond_image, model="control_v11p_sd15_depth")
    body = refusal(lambda: api.txt2img(prompt=PROMPT, steps=2, width=64, height=64, controlnet_units=[other],
                                       alwayson_scripts={}), "alwayson_scripts.controlnet.args[0].model")
    assert "canny-tiny" in body["detail"]
    adapter = adapter_unit(cond_image)  # no adapter loaded here
    refusal(lambda: api.txt2img(prompt=PROMPT, steps=2, width=64, height=64, controlnet_units=[unit, adapter],
                                alwayson_scripts={}), "alwayson_scripts.controlnet.args[1].image")


def test_sampler_names_map_both_ways():
    from ipadapter_instruct.engine.server.a1111_api import ALIASES, NAMES, sampler_name, scheduler
    for engine, name in NAMES.items():
        for given in (name, name.upper(), engine, *ALIASES.get(engine, [])):
            assert scheduler({"sampler_name": given}) == engine
        assert sampler_name(engine) == name
    assert scheduler({"sampler_index": "DPM++ 2M"}) == "dpmpp_2m" and scheduler({}) == "default"
    assert sampler_name("PNDMScheduler") == "PLMS"  # SD1.5's own scheduler, when a request names none


def test_with_an_api_key_the_routes_need_it_and_answer_401_in_a1111s_shape(instruct_pipe, tmp_path):
    from ipadapter_instruct.engine.server.config import ServerConfig
    from server_utils import InProcessServer
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    server = InProcessServer(ServerConfig(api_key_file=str(key), model="model", warmup=False), instruct_pipe)
    try:
        r = server.request("GET", "/sdapi/v1/samplers")
        assert r.status_code == 401 and r.json()["error"] == "unauthorized" and "Bearer" in r.json()["detail"]
        r = server.request("GET", "/sdapi/v1/sd-models", headers={"authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.json()[0]["model_name"] == "model"
    finally:
        server.close()
