"""OpenAI's images API, driven by the `openai` Python client itself (AsyncOpenAI over httpx's ASGI transport, the
app in process): client.models.list(), client.images.generate(..., extra_body=native fields) and client.images.edit
(an InstructPix2Pix edit; on a text-to-image server img2img, and with a mask inpainting) each give the image the
native route gives for the same request; bad inputs are OpenAI's error shape with the right status while a valid
request completes."""
import io
import re
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from conftest import NEGATIVE, PROMPT, load_pipe
from ipadapter_instruct.engine.server.config import ServerConfig
from server_utils import InProcessServer, decode_png, png_base64

STYLE = "use the style of this image"
EDIT = "make it look like winter"


def client_of(srv: InProcessServer, api_key: str = "x") -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=srv.app), base_url="http://127.0.0.1", timeout=120)
    return openai.AsyncOpenAI(base_url="http://127.0.0.1/v1", api_key=api_key, http_client=http, max_retries=0)


def listed(srv: InProcessServer, client: openai.AsyncOpenAI):
    async def page():  # client.models.list() is an awaitable paginator, not a coroutine
        return await client.models.list()
    return srv.call(page())


@pytest.fixture(scope="module")
def server(tiny):
    srv = InProcessServer(ServerConfig(max_wait_ms=300, max_upload_mb=1), load_pipe(tiny, tiny["adapter"]))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def edit_server(tiny_edit):
    srv = InProcessServer(ServerConfig(model=tiny_edit["model"], device="cpu", max_wait_ms=100), None)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def mask():
    m = np.zeros((64, 64), "uint8")
    m[32:] = 255
    return Image.fromarray(m).convert("RGB")


def png(image) -> tuple:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return ("image.png", buf.getvalue(), "image/png")


def close(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and int(np.abs(np.asarray(a, int) - np.asarray(b, int)).max()) <= 1


def native(srv, path, body) -> list:
    r = srv.request("POST", path, json=body)
    assert r.status_code == 200, r.text
    return [decode_png(im) for im in r.json()["images"]]


def extensions(cond, **kw):
    return {"negative_prompt": NEGATIVE, "ip_adapter_image": png_base64(cond), "instruct": STYLE,
            "num_inference_steps": 2, **kw}


def test_models_list_is_openais_and_keeps_the_native_card(server):
    listed_models = listed(server, client_of(server))
    card = listed_models.data[0]
    assert card.object == "model" and card.owned_by and isinstance(card.created, int)
    raw = server.request("GET", "/v1/models").json()["data"][0]
    assert raw["id"] == card.id and raw["task"] == "generate" and raw["adapter_kind"] == "instruct"
    assert raw["ipadapter_instruct"] == {"task": "generate", "adapters": [{"kind": "instruct", "name": None}],
                                         "controlnets": [],
                                         "loras": []}


def test_generate_equals_the_native_route(server, cond_image):
    client = client_of(server)
    out = server.call(client.images.generate(prompt=PROMPT, n=2, size="64x64", response_format="b64_json",
                                             quality="hd", style="vivid", user="u1",
                                             extra_body=extensions(cond_image, seed=5)))
    assert len(out.data) == 2 and out.data[0].revised_prompt == PROMPT and isinstance(out.created, int)
    assert out.model_extra["seed"] == 5 and out.model_extra["seeds"] == [5, 6]
    want = native(server, "/v1/generate", {"prompt": PROMPT, "num_images_per_prompt": 2, "width": 64, "height": 64,
                                            **extensions(cond_image, seed=5)})
    for got, ref in zip(out.data, want):
        assert close(decode_png(got.b64_json), ref)
    card = listed(server, client).data[0]  # the loaded model's id is accepted
    named = server.call(client.images.generate(model=card.id, prompt=PROMPT, size="64x64",
                                               extra_body=extensions(cond_image, seed=5)))
    assert close(decode_png(named.data[0].b64_json), want[0])


def test_edit_on_a_text_to_image_server_is_img2img_and_with_a_mask_inpainting(server, cond_image, photo, mask):
    client = client_of(server)
    body = extensions(cond_image, seed=7)
    out = server.call(client.images.edit(image=png(photo), mask=png(mask), prompt=PROMPT, extra_body=body))
    want = native(server, "/v1/generate", {"prompt": PROMPT, "init_image": png_base64(photo),
                                           "mask_image": png_base64(mask), **body})
    assert close(decode_png(out.data[0].b64_json), want[0])
    out = server.call(client.images.edit(image=png(photo), prompt=PROMPT, n=1, extra_body=body))
    want = native(server, "/v1/generate", {"prompt": PROMPT, "init_image": png_base64(photo), **body})
    assert close(decode_png(out.data[0].b64_json), want[0]) and out.model_extra["seeds"] == [7]


def test_edit_on_an_instructpix2pix_server_equals_the_native_edit(edit_server, photo):
    client = client_of(edit_server)
    out = edit_server.call(client.images.edit(image=png(photo), prompt=EDIT,
                                              extra_body={"num_inference_steps": 2, "seed": 3}))
    want = native(edit_server, "/v1/edit", {"prompt": EDIT, "image": png_base64(photo), "num_inference_steps": 2,
                                            "seed": 3})
    assert close(decode_png(out.data[0].b64_json), want[0])
    with pytest.raises(openai.BadRequestError) as e:  # a mask means nothing to InstructPix2Pix
        edit_server.call(client.images.edit(image=png(photo), mask=png(photo), prompt=EDIT))
    assert e.value.body["param"] == "mask"
    assert listed(edit_server, client).data[0].model_extra["ipadapter_instruct"]["task"] == "edit"


@pytest.mark.parametrize("kw, error, status, param", [
    ({"size": "abc"}, openai.BadRequestError, 400, "size"),
    ({"response_format": "url"}, openai.BadRequestError, 400, "response_format"),
    ({"model": "dall-e-3"}, openai.NotFoundError, 404, "model"),
    ({"extra_body": {"strength": 5}}, openai.UnprocessableEntityError, 422, "strength"),
    ({"extra_body": {"no_such_field": 1}}, openai.UnprocessableEntityError, 422, "no_such_field"),
    ({"size": "64x100000"}, openai.UnprocessableEntityError, 422, "size"),
])
def test_bad_input_is_openais_error_shape_and_status(server, cond_image, kw, error, status, param):
    client = client_of(server)
    extra = {**extensions(cond_image, seed=1), **kw.pop("extra_body", {})}
    r = server.request("POST", "/v1/images/generations", json={"prompt": PROMPT, **kw, **extra})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    with pytest.raises(error) as e:
        server.call(client.images.generate(prompt=PROMPT, **kw, extra_body=extra))
    assert e.value.status_code == status and e.value.body["param"] == param


def test_a_valid_request_completes_beside_bad_ones(server, cond_image):
    import asyncio
    client = client_of(server)

    async def both():
        good = client.images.generate(prompt=PROMPT, size="64x64", extra_body=extensions(cond_image, seed=2))
        bad = client.images.generate(prompt=PROMPT, size="abc", extra_body=extensions(cond_image))
        return await asyncio.gather(good, bad, return_exceptions=True)
    good, bad = server.call(both())
    assert len(good.data) == 1 and isinstance(bad, openai.BadRequestError)


def test_the_api_key_is_checked_in_openais_shape(tiny, tmp_path):
    key = tmp_path / "key"
    key.write_text("s3cret")
    srv = InProcessServer(ServerConfig(api_key_file=str(key), max_wait_ms=10), load_pipe(tiny, tiny["adapter"]))
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            srv.call(client_of(srv, "wrong").images.generate(prompt=PROMPT, extra_body={"num_inference_steps": 1}))
        assert e.value.body["type"] == "authentication_error"
        assert listed(srv, client_of(srv, "s3cret")).data[0].object == "model"
    finally:
        srv.close()


def test_the_docs_openai_client_block_runs_against_a_real_server(tiny, cond_image, photo, mask, tmp_path,
                                                                 monkeypatch):
    """docs/server.md's `from openai import OpenAI` block, as written but for the URL and the step count, against
    uvicorn on a free port (the sync client needs a real socket)."""
    from test_server_http import ThreadServer

    page = (Path(__file__).resolve().parent.parent / "docs" / "server.md").read_text()
    block = next(b for b in re.findall(r"^```python\n(.*?)^```", page, re.S | re.M) if "from openai import OpenAI" in b)
    paths = {k: str(tiny[k]) for k in ("model", "image_encoder", "adapter")}
    srv = ThreadServer(ServerConfig(max_wait_ms=10, **paths), load_pipe(tiny, tiny["adapter"]))
    try:
        monkeypatch.chdir(tmp_path)
        for name, im in (("cond.png", cond_image), ("photo.png", photo), ("mask.png", mask)):
            im.save(name)
        code = block.replace("http://127.0.0.1:8000", srv.url).replace('"num_inference_steps": 30',
                                                                        '"num_inference_steps": 2')
        scope = {}
        exec(compile(code, "docs/server.md", "exec"), scope)
        assert len(scope["images"]) == 2 and scope["out"].model_extra["seeds"] == [5, 6]
        assert scope["model"].model_extra["ipadapter_instruct"]["task"] == "generate"
        assert decode_png(scope["edited"].data[0].b64_json).size == photo.size
    finally:
        srv.close()


def test_an_openai_request_batches_with_a_native_one(server, cond_image):
    """The same batch key: one call serves both (the native answer's timings say so), each its own image."""
    body = {"prompt": PROMPT, **extensions(cond_image, seed=9)}
    native_r, openai_r = server.concurrently(("POST", "/v1/generate", {"json": body}),
                                             ("POST", "/v1/images/generations", {"json": {**body, "seed": 10}}))
    assert native_r.status_code == openai_r.status_code == 200, (native_r.text, openai_r.text)
    assert native_r.json()["timings"]["batch_requests"] == 2
    want = native(server, "/v1/generate", {**body, "seed": 10})
    assert close(decode_png(openai_r.json()["data"][0]["b64_json"]), want[0])


def test_step_level_batching_serves_the_openai_route_too(tiny, cond_image):
    srv = InProcessServer(ServerConfig(batching="step", max_wait_ms=10), load_pipe(tiny, tiny["adapter"]))
    try:
        out = srv.call(client_of(srv).images.generate(prompt=PROMPT, n=2, extra_body=extensions(cond_image, seed=4)))
        want = native(srv, "/v1/generate", {"prompt": PROMPT, "num_images_per_prompt": 2,
                                            **extensions(cond_image, seed=4)})
        assert all(close(decode_png(d.b64_json), ref) for d, ref in zip(out.data, want))
        unit = {"image": png_base64(cond_image), "module": "ip-adapter_clip_sd15", "model": "ip-adapter-instruct",
                "weight": 0.8, "instruct": STYLE}  # Automatic1111's route on the step-level server too
        a1111 = srv.call(srv.client.post("/sdapi/v1/txt2img", json={
            "prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": 4, "steps": 2, "width": 64, "height": 64,
            "cfg_scale": 6.0, "alwayson_scripts": {"controlnet": {"args": [unit]}}}))
        assert a1111.status_code == 200, a1111.text
        assert close(decode_png(a1111.json()["images"][0]), want[0])
    finally:
        srv.close()


def test_native_openai_and_automatic1111_requests_batch_together(server, cond_image):
    """Three shapes, one batch key: one call serves a native, an OpenAI and an Automatic1111 request (their answers
    say so), each with its own seed."""
    import json

    native = {"prompt": PROMPT, "height": 64, "width": 64, **extensions(cond_image, seed=11)}
    unit = {"image": png_base64(cond_image), "module": "ip-adapter_clip_sd15", "model": "ip-adapter-instruct",
            "weight": 0.8, "instruct": STYLE}
    a1111 = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": 13, "steps": 2, "width": 64, "height": 64,
             "cfg_scale": 6.0, "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    answers = server.concurrently(("POST", "/v1/generate", {"json": native}),
                                  ("POST", "/v1/images/generations", {"json": {**native, "seed": 12}}),
                                  ("POST", "/sdapi/v1/txt2img", {"json": a1111}))
    assert [r.status_code for r in answers] == [200] * 3, [r.text for r in answers]
    assert answers[0].json()["timings"]["batch_requests"] == 3
    assert answers[1].json()["seeds"] == [12] and json.loads(answers[2].json()["info"])["seed"] == 13


def test_every_shape_counts_in_the_request_metric(server, cond_image):
    """engine_requests_total counts OpenAI's and Automatic1111's generation routes as it counts /v1/generate."""
    def count() -> float:
        text = server.call(server.client.get("/metrics")).text
        return next((float(line.split()[-1]) for line in text.splitlines()
                     if line.startswith('engine_requests_total{status="200"} ')), 0.0)
    before = count()
    unit = {"image": png_base64(cond_image), "module": "ip-adapter", "model": "ip-adapter", "instruct": STYLE}
    answers = [server.call(server.client.post("/v1/images/generations",
                                              json={"prompt": PROMPT, **extensions(cond_image, seed=1)})),
               server.call(server.client.post("/sdapi/v1/txt2img", json={
                   "prompt": PROMPT, "seed": 2, "steps": 2, "width": 64, "height": 64,
                   "alwayson_scripts": {"controlnet": {"args": [unit]}}}))]
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
    assert count() == before + 2
