"""POST /v1/edit: a server started on an InstructPix2Pix folder loads EditPipeline by itself and edits; answers equal
EditPipeline alone, requests share calls, the bodies and errors follow /v1/generate's rules, and each endpoint
refuses the other kind of model with a 404 that says which to use."""
import base64
import io

import numpy as np
import pytest
from PIL import Image

from ipadapter_instruct.engine.server.config import ServerConfig
from server_utils import InProcessServer, decode_png, png_base64

EDIT = "make it look like winter"


@pytest.fixture(scope="module")
def server(tiny_edit):
    srv = InProcessServer(ServerConfig(model=tiny_edit["model"], device="cpu", max_wait_ms=300), None)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray((np.random.RandomState(0).rand(70, 54, 3) * 255).astype("uint8"))


def alone(pipe, photo, **kw):
    out = pipe(EDIT, photo, **{"num_inference_steps": 2, **kw})
    return [Image.open(io.BytesIO(base64.b64decode(png_base64(im)))).convert("RGB") for im in out]


def close(a, b) -> bool:
    return int(np.abs(np.asarray(a, int) - np.asarray(b, int)).max()) <= 1


def test_an_edit_equals_the_pipeline_alone(server, photo):
    r = server.request("POST", "/v1/edit", json={"prompt": EDIT, "image": png_base64(photo), "num_inference_steps": 2,
                                                 "seed": 3})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["timings"]["batch_rows"] == 3 and "image_latent_ms" in out["timings"]  # the three IP2P branches
    got = decode_png(out["images"][0])
    assert got.size == (52, 68)  # the photo's size on the VAE grid
    assert close(got, alone(server.state.pipe, photo, seed=3)[0])
    card = server.request("GET", "/v1/models").json()["data"][0]
    assert card["task"] == "edit"


def test_edits_share_a_call_and_each_equals_itself_alone(server, photo):
    other = photo.transpose(Image.FLIP_LEFT_RIGHT)
    bodies = [{"prompt": EDIT, "image": png_base64(photo), "num_inference_steps": 2, "seed": 1},
              {"prompt": "turn it into a painting", "image": png_base64(other), "num_inference_steps": 2, "seed": 2,
               "guidance_scale": 4.0, "image_guidance_scale": 1.2}]
    answers = server.concurrently(*[("POST", "/v1/edit", {"json": b}) for b in bodies])
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert [a.json()["timings"]["batch_requests"] for a in answers] == [2, 2]
    pipe = server.state.pipe
    assert close(decode_png(answers[0].json()["images"][0]), alone(pipe, photo, seed=1)[0])
    assert close(decode_png(answers[1].json()["images"][0]),
                 pipe("turn it into a painting", other, num_inference_steps=2, seed=2, guidance_scale=4.0,
                      image_guidance_scale=1.2)[0])


def test_multipart_and_png_answers(server, photo):
    buf = io.BytesIO()
    photo.save(buf, format="PNG")
    r = server.request("POST", "/v1/edit", data={"prompt": EDIT, "num_inference_steps": "2", "seed": "3"},
                       files={"image": ("photo.png", buf.getvalue(), "image/png")}, headers={"accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    assert close(Image.open(io.BytesIO(r.content)).convert("RGB"), alone(server.state.pipe, photo, seed=3)[0])


@pytest.mark.parametrize("body, status, field", [
    ({"prompt": EDIT}, 422, "image"),
    ({"prompt": EDIT, "image": "@photo", "ip_adapter_image": "@photo"}, 422, "ip_adapter_image"),
    ({"prompt": EDIT, "image": "@photo", "adapter_image": "@photo"}, 422, "ip_adapter_image"),  # (its old name)
    ({"prompt": EDIT, "image": "@photo", "adapter_image": "@photo", "ip_adapter_image": "@photo"}, 422,
     "ip_adapter_image"),
    ({"prompt": EDIT, "image": "@photo", "height": 30, "width": 32}, 422, "height"),
    ({"prompt": EDIT, "image": "@photo", "guidance_mode": "full"}, 422, "guidance_mode"),  # not an edit field
    ({"image": "@photo"}, 422, "prompt"),
    ({"prompt": EDIT, "image": "not base64!"}, 422, "image"),
])
def test_bad_edits_are_4xx_naming_the_field(server, photo, body, status, field):
    body = {k: png_base64(photo) if v == "@photo" else v for k, v in body.items()}
    r = server.request("POST", "/v1/edit", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field, r.text


def test_each_endpoint_refuses_the_other_kind_of_model(server, tiny):
    from conftest import load_pipe
    r = server.request("POST", "/v1/generate", json={"prompt": "a house"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "wrong_task" and "/v1/edit" in r.text
    gen = InProcessServer(ServerConfig(), load_pipe(tiny, None))
    try:
        r = gen.request("POST", "/v1/edit", json={"prompt": EDIT})
        assert r.status_code == 404 and "POST /v1/generate" in r.json()["error"]["message"]
        assert gen.request("GET", "/v1/models").json()["data"][0]["task"] == "generate"
    finally:
        gen.close()


def test_serve_on_an_ip2p_folder_and_the_python_client(tiny_edit, server, photo):
    """`python -m engine serve --model IP2P_DIR` (a real process) edits; engine.client.Client.edit talks to it."""
    from ipadapter_instruct.engine.client import Client, ServerError
    from server_utils import ServerProcess

    proc = ServerProcess(["--model", tiny_edit["model"], "--device", "cpu"])
    try:
        client = Client(proc.url)
        got = client.edit(EDIT, photo, num_inference_steps=2, seed=3)[0]
        assert close(got, alone(server.state.pipe, photo, seed=3)[0]) and client.last_result["seed"] == 3
        assert client.models()["data"][0]["task"] == "edit"
        assert "ready: " + proc.url + " (InstructPix2Pix edit, cpu," in proc.output()   # the ready line names the task
        with pytest.raises(ServerError) as e:
            client.edit(EDIT, photo, num_inference_steps=2, adapter_image=photo)
        assert e.value.status == 422 and e.value.field == "ip_adapter_image"
        with pytest.raises(TypeError, match="guidance_mode"):
            client.edit(EDIT, photo, guidance_mode="full")
    finally:
        proc.terminate()


def test_edits_in_step_mode_join_and_each_equals_itself_alone(tiny_edit, photo):
    """`serve --batching step` on an InstructPix2Pix model: edits with other photos, steps and guidance share the
    running UNet steps (the photo latent rides with each flight's rows) and each answer is the pipeline's alone."""
    srv = InProcessServer(ServerConfig(model=tiny_edit["model"], device="cpu", batching="step"), None)
    try:
        other = photo.transpose(Image.FLIP_LEFT_RIGHT)
        bodies = [{"prompt": EDIT, "image": png_base64(photo), "num_inference_steps": 4, "seed": 1},
                  {"prompt": "turn it into a painting", "image": png_base64(other), "num_inference_steps": 2,
                   "seed": 2, "guidance_scale": 4.0, "image_guidance_scale": 1.2}]
        answers = srv.concurrently(*[("POST", "/v1/edit", {"json": b}) for b in bodies])
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        assert max(a.json()["timings"]["batch_requests"] for a in answers) == 2  # they shared steps
        pipe = srv.state.pipe
        assert close(decode_png(answers[0].json()["images"][0]), alone(pipe, photo, seed=1, num_inference_steps=4)[0])
        want = pipe("turn it into a painting", other, num_inference_steps=2, seed=2, guidance_scale=4.0,
                    image_guidance_scale=1.2)[0]
        assert close(decode_png(answers[1].json()["images"][0]), want)
    finally:
        srv.close()


@pytest.mark.parametrize("batching", ["request", "step"])
def test_an_edit_server_with_an_adapter_takes_the_reference_image(tiny_edit, photo, batching):
    """`serve --model IP2P --image-encoder --adapter`: the reference image reaches the adapter (it once went into the
    work's ControlNet slot, and the server could not even warm up); the answer is the pipeline's alone."""
    srv = InProcessServer(ServerConfig(model=tiny_edit["model"], image_encoder=tiny_edit["image_encoder"],
                                       adapter=tiny_edit["adapter"], device="cpu", batching=batching), None)
    try:
        reference = photo.transpose(Image.FLIP_TOP_BOTTOM)
        body = {"prompt": EDIT, "image": png_base64(photo), "ip_adapter_image": png_base64(reference),
                "instruct": "use the style of this image", "scale": 0.7, "num_inference_steps": 2, "seed": 3}
        r = srv.request("POST", "/v1/edit", json=body)
        assert r.status_code == 200, r.text
        pipe = srv.state.pipe
        want = alone(pipe, photo, adapter_image=reference, instruct="use the style of this image", scale=0.7, seed=3)
        assert close(decode_png(r.json()["images"][0]), want[0])
        text = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).text["parameters"]
        assert text.startswith(EDIT + "\n") and r.json()["seeds"] == [3], text  # each PNG carries its parameters
        assert {"Seed: 3", "Steps: 2", "Instruct: use the style of this image", "IP-Adapter scale: 0.7",
                "Image CFG scale: 1.5"} <= set(text.splitlines()[-1].split(", ")), text
        old = {("adapter_image" if k == "ip_adapter_image" else k): v for k, v in body.items()}  # the old name
        assert srv.request("POST", "/v1/edit", json=old).json()["images"] == r.json()["images"]
        r = srv.request("POST", "/v1/edit", json={k: v for k, v in body.items() if k != "ip_adapter_image"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "ip_adapter_image", r.text
        # no seed: a fresh one, answered, which reproduces the edit
        seedless = [srv.request("POST", "/v1/edit", json={k: v for k, v in body.items() if k != "seed"})
                    for _ in range(2)]
        seeds = [a.json()["seed"] for a in seedless]
        assert seeds[0] != seeds[1] and [a.headers["x-seed"] for a in seedless] == [str(x) for x in seeds]
        again = srv.request("POST", "/v1/edit", json={**body, "seed": seeds[0]})
        assert again.json()["images"] == seedless[0].json()["images"]
    finally:
        srv.close()
