"""One set of names, defaults and seeds on the HTTP API (issue 28): a request without a seed gets a fresh one, which
the answer returns (JSON `seed`, `x-seed`, the stream's result) and which reproduces the image when sent back, in
both batching modes; the reference image is `ip_adapter_image` (`image` kept as an alias); the defaults are the
Python API's; a 4xx names the server's own flags; the ready line names the task; each image has its own seed
(`seeds`), which its PNG's "parameters" chunk carries too."""
import base64
import inspect
import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from ipadapter_instruct.engine.results import DRAWN_LIMIT
from ipadapter_instruct.engine.server.config import ServerConfig
from ipadapter_instruct.engine.server.schemas import EditRequest, GenerateRequest

from conftest import NEGATIVE, PROMPT, load_pipe
from server_utils import InProcessServer, decode_png, png_base64

STYLE = "use the style of this image"


@pytest.fixture(scope="module", params=["request", "step"])
def server(request, tiny):
    srv = InProcessServer(ServerConfig(batching=request.param, max_wait_ms=50), load_pipe(tiny, tiny["adapter"]))
    yield srv
    srv.close()


def body(image, **kw):
    return {"prompt": PROMPT, "negative_prompt": NEGATIVE, "ip_adapter_image": png_base64(image), "instruct": STYLE,
            "num_inference_steps": 2, **kw}


def ok(r):
    assert r.status_code == 200, r.text
    return r


def error_of(r, status, field):
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field, r.text
    return r.json()["error"]["message"]


def test_a_request_without_a_seed_gets_a_fresh_one_which_reproduces_it(server, cond_image):
    first, second = (ok(server.request("POST", "/v1/generate", json=body(cond_image))) for _ in range(2))
    seeds = [first.json()["seed"], second.json()["seed"]]
    assert seeds[0] != seeds[1] and all(isinstance(s, int) and 0 <= s < DRAWN_LIMIT for s in seeds), seeds  # the API's range
    assert [first.headers["x-seed"], second.headers["x-seed"]] == [str(s) for s in seeds]
    again = ok(server.request("POST", "/v1/generate", json=body(cond_image, seed=seeds[0])))
    assert again.json()["seed"] == seeds[0] and again.headers["x-seed"] == str(seeds[0])
    assert again.json()["images"] == first.json()["images"]  # the same PNG bytes
    png = ok(server.request("POST", "/v1/generate", json=body(cond_image, seed=seeds[0]),
                            headers={"accept": "image/png"}))
    assert png.content == base64.b64decode(first.json()["images"][0]) and png.headers["x-seed"] == str(seeds[0])
    explicit_null = ok(server.request("POST", "/v1/generate", json=body(cond_image, seed=None)))
    assert explicit_null.json()["seed"] not in seeds


def test_a_streamed_answer_returns_its_seed(server, cond_image):
    r = ok(server.request("POST", "/v1/generate", json=body(cond_image, stream=True)))
    frames = [f.split("\n") for f in r.text.strip().split("\n\n")]
    result = json.loads(next(f[1] for f in frames if f[0] == "event: result").removeprefix("data: "))
    assert r.headers["x-seed"] == str(result["seed"])
    again = ok(server.request("POST", "/v1/generate", json=body(cond_image, seed=result["seed"])))
    assert again.json()["images"] == result["images"]


def test_the_old_field_names_are_aliases(server, cond_image):
    new = ok(server.request("POST", "/v1/generate", json=body(cond_image, seed=5, num_images_per_prompt=2)))
    old = dict(body(cond_image, seed=5, num_images=2))
    old["image"] = old.pop("ip_adapter_image")
    assert ok(server.request("POST", "/v1/generate", json=old)).json()["images"] == new.json()["images"]
    buf = io.BytesIO()
    cond_image.save(buf, format="PNG")
    form = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "instruct": STYLE, "num_inference_steps": "2",
            "seed": "5", "num_images_per_prompt": "2"}
    for name in ("ip_adapter_image", "image"):
        r = ok(server.request("POST", "/v1/generate", data=form, files={name: ("c.png", buf.getvalue(), "image/png")}))
        assert r.json()["images"] == new.json()["images"], name


@pytest.mark.parametrize("old, new", [("image", "ip_adapter_image"), ("num_images", "num_images_per_prompt")])
def test_a_name_and_its_alias_at_once_is_a_422_naming_the_field(server, cond_image, old, new):
    both = {**body(cond_image), "image": png_base64(cond_image), "num_images": 1, "num_images_per_prompt": 1}
    both = {k: v for k, v in both.items() if k not in {"image", "ip_adapter_image", "num_images",
                                                       "num_images_per_prompt"} - {old, new}}
    message = error_of(server.request("POST", "/v1/generate", json=both), 422, new)
    assert message == f"{new}: give {new} or its old name {old}, not both", message


def test_a_file_part_and_its_alias_at_once_is_a_422(server, cond_image):
    data = base64.b64decode(png_base64(cond_image))
    files = [("image", ("a.png", data, "image/png")), ("ip_adapter_image", ("b.png", data, "image/png"))]
    r = server.request("POST", "/v1/generate", data={"instruct": STYLE}, files=files)
    error_of(r, 422, "ip_adapter_image")


def test_a_size_over_the_limit_names_the_servers_flag(server, cond_image):
    message = error_of(server.request("POST", "/v1/generate", json=body(cond_image, width=4096)), 422, "width")
    assert "serve --max-size" in message and "Python" not in message, message


def test_serve_max_size_raises_the_limit(tiny, cond_image):
    srv = InProcessServer(ServerConfig(max_size=320, max_pixels=100 * 100, warmup=False),
                          load_pipe(tiny, tiny["adapter"]))
    try:
        big = cond_image.resize((101, 100))
        assert "serve --max-pixels" in error_of(srv.request("POST", "/v1/generate", json=body(big)), 413,
                                                "ip_adapter_image")
        r = ok(srv.request("POST", "/v1/generate", json=body(cond_image, width=320, height=8)))
        assert r.json()["images"]
        message = error_of(srv.request("POST", "/v1/generate", json=body(cond_image, width=324)), 422, "width")
        assert "320" in message and "serve --max-size" in message, message
    finally:
        srv.close()


def api_defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


@pytest.mark.parametrize("model, api", [(GenerateRequest, "Pipeline"), (EditRequest, "EditPipeline")])
def test_the_defaults_are_the_python_apis(model, api):
    import ipadapter_instruct.engine as engine

    want = api_defaults(getattr(engine, api).__call__)
    shared = [f for f in model.model_fields if f in want and f not in ("seed", "scheduler")]
    assert {"num_inference_steps", "num_images_per_prompt", "guidance_scale", "negative_prompt"} <= set(shared)
    assert {f: model.model_fields[f].default for f in shared} == {f: want[f] for f in shared}
    assert model.model_fields["seed"].default is None  # random, drawn by the server


def test_the_ready_line_names_the_task():
    from ipadapter_instruct.engine.server.state import task_name

    assert [task_name(k) for k in ("sd15", "sdxl", "edit")] == [
        "text-to-image", "SDXL text-to-image", "InstructPix2Pix edit"]


def test_the_ready_line_of_a_server(tiny, capsys):
    srv = InProcessServer(ServerConfig(warmup=False), load_pipe(tiny, tiny["adapter"]))
    assert srv.request("GET", "/ready").json()["task"] == "text-to-image"  # what `serve --ray`'s ready line says
    srv.close()
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("ready:"))
    assert "(text-to-image, instruct adapter," in line, line


def png_text(data: bytes) -> str:
    return Image.open(io.BytesIO(data)).text["parameters"]


def within_one_level(a, b) -> bool:
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()) <= 1


def test_each_image_has_its_own_seed_which_gives_it_back_alone(server, cond_image):
    two = ok(server.request("POST", "/v1/generate", json=body(cond_image, num_images_per_prompt=2)))
    seed, seeds = two.json()["seed"], two.json()["seeds"]
    assert seeds == [seed, seed + 1] and two.headers["x-seed"] == str(seed)  # x-seed: the request's seed
    alone = ok(server.request("POST", "/v1/generate", json=body(cond_image, seed=seeds[1])))
    assert alone.json()["seeds"] == [seeds[1]] and alone.headers["x-seed"] == str(seeds[1])
    assert within_one_level(decode_png(alone.json()["images"][0]), decode_png(two.json()["images"][1]))


def test_every_png_carries_its_parameters_and_their_seed_gives_it_back(server, cond_image, tiny):
    two = ok(server.request("POST", "/v1/generate", json=body(cond_image, num_images_per_prompt=2))).json()
    texts = [png_text(base64.b64decode(b)) for b in two["images"]]
    for text, seed in zip(texts, two["seeds"]):
        prompt, negative, line = text.split("\n")
        assert prompt == PROMPT and negative == f"Negative prompt: {NEGATIVE}", text
        pairs = dict(pair.split(": ", 1) for pair in line.split(", "))
        assert {"Steps": "2", "Seed": str(seed), "Size": "64x64", "Model": os.path.basename(tiny["model"]),
                "Instruct": STYLE, "IP-Adapter scale": "0.8", "CFG scale": "6.0"}.items() <= pairs.items(), text
        assert pairs["Sampler"], text
    seed = int(re.search(r"Seed: (\d+)", texts[1]).group(1))
    png = ok(server.request("POST", "/v1/generate", json=body(cond_image, seed=seed), headers={"accept": "image/png"}))
    assert f"Seed: {seed}" in png_text(png.content)  # the lone PNG answer carries them too
    assert within_one_level(Image.open(io.BytesIO(png.content)).convert("RGB"), decode_png(two["images"][1]))


def test_a_text_only_server_needs_a_prompt_and_writes_no_adapter_prompts(tiny):
    from ipadapter_instruct.engine import Pipeline

    srv = InProcessServer(ServerConfig(warmup=False), Pipeline.from_pretrained(tiny["model"], device="cpu"))
    try:
        message = error_of(srv.request("POST", "/v1/generate", json={"num_inference_steps": 2}), 422, "prompt")
        assert "prompt" in message, message
        r = ok(srv.request("POST", "/v1/generate", json={"prompt": PROMPT, "num_inference_steps": 2}))
        text = png_text(base64.b64decode(r.json()["images"][0]))
        assert text.startswith(PROMPT + "\n") and "Negative prompt" not in text and "Instruct" not in text, text
    finally:
        srv.close()
