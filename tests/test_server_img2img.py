"""POST /v1/generate from a photo: `init_image` + `strength` (img2img) and `mask_image` (inpainting), base64 or file
parts. Answers equal `Pipeline` alone; requests of one start step share a call (different photos, masks and
strengths), requests of different start steps never do; under step-level batching an img2img flight and a
text-to-image flight step together and each equals itself alone; bad inputs are a 422 naming the field before any
work; /v1/models says whether the model is an inpainting one."""
import base64
import io

import numpy as np
import pytest
from PIL import Image

from conftest import NEGATIVE, PROMPT, load_pipe
from ipadapter_instruct.engine.server.config import ServerConfig
from ipadapter_instruct.engine.server.schemas import GenerateRequest
from server_utils import InProcessServer, decode_png, png_base64

STYLE = "use the style of this image"


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray((np.random.RandomState(0).rand(72, 56, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def mask():
    """White (repaint) in the lower half of a 56x72 mask."""
    m = np.zeros((72, 56), "uint8")
    m[36:] = 255
    return Image.fromarray(m).convert("RGB")


@pytest.fixture(scope="module")
def server(tiny):
    srv = InProcessServer(ServerConfig(max_wait_ms=400, max_upload_mb=1, max_pixels=200 * 200),
                          load_pipe(tiny, tiny["adapter"]))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def inpaint_server(tiny_inpaint):
    srv = InProcessServer(ServerConfig(max_wait_ms=300), load_pipe(tiny_inpaint, tiny_inpaint["adapter"]))
    yield srv
    srv.close()


def body(cond, **kw):
    return {"prompt": PROMPT, "negative_prompt": NEGATIVE, "ip_adapter_image": png_base64(cond), "instruct": STYLE,
            "num_inference_steps": 4, **{k: png_base64(v) if isinstance(v, Image.Image) else v for k, v in kw.items()}}


def alone(pipe, cond, **kw):
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, image=cond, instruct=STYLE, num_inference_steps=4, **kw)
    return [decode_png(png_base64(im)) for im in out]


def close(a, b) -> bool:
    return a.size == b.size and int(np.abs(np.asarray(a, int) - np.asarray(b, int)).max()) <= 1


def test_img2img_equals_the_pipeline_alone_at_the_photos_size(server, cond_image, photo):
    r = server.request("POST", "/v1/generate", json=body(cond_image, init_image=photo, strength=0.5, seed=3))
    assert r.status_code == 200, r.text
    got = decode_png(r.json()["images"][0])
    assert got.size == photo.size  # 56x72 is on the tiny VAE's grid: the photo's own size
    assert "strength: 0.5" in _open_png(r.json()["images"][0]).text["parameters"]  # the PNG says it
    assert close(got, alone(server.state.pipe, cond_image, init_image=photo, strength=0.5, seed=3)[0])


def test_a_file_part_photo_and_mask_equal_base64(server, cond_image, photo, mask):
    fields = {k: str(v) for k, v in body(cond_image, strength=0.75, seed=4).items() if k != "ip_adapter_image"}
    files = {name: (name + ".png", _png(im), "image/png") for name, im in
             (("ip_adapter_image", cond_image), ("init_image", photo), ("mask_image", mask))}
    r = server.request("POST", "/v1/generate", data=fields, files=files)
    assert r.status_code == 200, r.text
    want = alone(server.state.pipe, cond_image, init_image=photo, mask_image=mask, strength=0.75, seed=4)[0]
    assert close(decode_png(r.json()["images"][0]), want)


def _open_png(text: str):
    return Image.open(io.BytesIO(base64.b64decode(text)))


def _png(im) -> bytes:
    return base64.b64decode(png_base64(im))


def test_one_start_step_shares_a_call_and_other_starts_do_not(server, cond_image, other_image, photo, mask):
    """4 steps: strengths 0.5 and 0.6 both start at step 2 (one call), 1.0 and text to image at step 0 (another);
    each answer equals its request alone."""
    flipped = photo.transpose(Image.FLIP_LEFT_RIGHT)
    reqs = [dict(init_image=photo, strength=0.5, seed=1),
            dict(init_image=flipped, mask_image=mask, strength=0.6, seed=2, height=72, width=56),
            dict(init_image=photo, strength=1.0, seed=3, height=72, width=56),
            dict(seed=5, height=72, width=56)]
    answers = server.concurrently(*[("POST", "/v1/generate", {"json": body(cond_image, **kw)}) for kw in reqs])
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    assert [a.json()["timings"]["batch_requests"] for a in answers] == [2, 2, 2, 2]
    for a, kw in zip(answers, reqs):
        assert close(decode_png(a.json()["images"][0]), alone(server.state.pipe, cond_image, **kw)[0]), kw


def test_keys_part_start_steps_and_sizes(server, cond_image, photo):
    runner = server.state.runner

    def key(**kw):
        images = {"init_image": kw.pop("init_image", None), "mask_image": kw.pop("mask_image", None)}
        req = GenerateRequest(prompt=PROMPT, instruct=STYLE, num_inference_steps=10, **kw)
        return runner.key(runner.prepare(req, cond_image, **images))
    assert key(init_image=photo, strength=0.5) == key(init_image=photo.rotate(90), strength=0.55)  # both from step 5
    assert key(init_image=photo, strength=0.5) != key(init_image=photo, strength=0.6)
    assert key(init_image=photo, strength=1.0, height=72, width=56) == key(height=72, width=56)
    assert key(init_image=photo, strength=1.0) != key()  # the photo's size, not the native one


@pytest.mark.parametrize("kw, field", [
    (dict(init_image="photo", strength=0.0), "strength"),
    (dict(init_image="photo", strength=1.5), "strength"),
    (dict(init_image="photo", strength=0.05), "strength"),   # int(4 x 0.05) = 0 steps
    (dict(mask_image="mask"), "mask_image"),
    (dict(strength=0.5), "strength"),
    (dict(init_image="photo", mask_image="small"), "mask_image"),
    (dict(init_image="big", mask_image="big other", height=64, width=64), "mask_image"),  # both reduced to 64x64
    (dict(init_image="text"), "init_image"),
], ids=["zero", "over-one", "no-step", "mask-alone", "strength-alone", "mask-size", "mask-size-as-sent", "not-png"])
def test_bad_inputs_are_a_422_naming_the_field(server, cond_image, photo, mask, kw, field):
    images = {"photo": photo, "mask": mask, "small": mask.resize((40, 40)), "big": photo.resize((100, 100)),
              "big other": mask.resize((96, 100)), "text": "aGVsbG8="}
    sent = {k: images[v] if isinstance(v, str) else v for k, v in kw.items()}
    r = server.request("POST", "/v1/generate", json=body(cond_image, seed=1, **sent))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field, r.json()


def test_an_inpainting_model_says_so_and_needs_a_photo_and_mask(inpaint_server, cond_image, photo, mask):
    card = inpaint_server.request("GET", "/v1/models").json()["data"][0]
    assert card["inpainting"] is True
    for kw, field in ((dict(), "init_image"), (dict(init_image=photo), "mask_image")):
        r = inpaint_server.request("POST", "/v1/generate", json=body(cond_image, seed=1, **kw))
        assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text
    r = inpaint_server.request("POST", "/v1/generate", json=body(cond_image, init_image=photo, mask_image=mask,
                                                                 seed=2))
    assert r.status_code == 200, r.text
    got = decode_png(r.json()["images"][0])
    want = alone(inpaint_server.state.pipe, cond_image, init_image=photo, mask_image=mask, seed=2)[0]
    assert close(got, want) and got.size == want.size


def test_a_regular_model_is_no_inpainting_one(server):
    assert server.request("GET", "/v1/models").json()["data"][0]["inpainting"] is False


def test_an_img2img_flight_and_a_text_flight_step_together_each_as_alone(instruct_pipe, cond_image, photo, mask):
    """Step-level batching: each request is a flight with its own cut schedule."""
    from test_server_stepping import run_jobs
    bodies = [dict(prompt=PROMPT, instruct=STYLE, num_inference_steps=4, seed=1, height=72, width=56),
              dict(prompt=PROMPT, instruct=STYLE, num_inference_steps=4, seed=2, strength=0.5),
              dict(prompt=PROMPT, instruct=STYLE, num_inference_steps=4, seed=3, strength=0.75,
                   height=72, width=56)]
    images = [{}, {"init_image": photo}, {"init_image": photo, "mask_image": mask}]
    outcomes, jobs = run_jobs(instruct_pipe, cond_image, bodies, photos=dict(enumerate(images)))
    assert max(j.batch_requests for j in jobs.values()) == 3  # all three in one step at some point
    for out, b, im in zip(outcomes, bodies, images):
        assert not isinstance(out, Exception), out
        want = instruct_pipe(image=cond_image, negative_prompt=NEGATIVE, **b, **im)
        assert np.abs(np.asarray(out["images"][0], int) - np.asarray(want[0], int)).max() <= 1


def test_the_client_sends_a_photo_and_mask_as_paths_or_pil(tiny, instruct_pipe, cond_image, photo, mask, tmp_path):
    from ipadapter_instruct.engine.client import Client, ServerError
    from server_utils import ServerProcess, tiny_args

    photo.save(tmp_path / "photo.png")
    args = dict(prompt=PROMPT, negative_prompt=NEGATIVE, instruct=STYLE, num_inference_steps=4, seed=6,
                height=72, width=56)
    with ServerProcess(tiny_args(tiny)) as srv:
        client = Client(srv.url)
        got = client.generate(ip_adapter_image=cond_image, init_image=str(tmp_path / "photo.png"), mask_image=mask,
                              strength=0.75, **args)
        with pytest.raises(ServerError) as refused:
            client.generate(ip_adapter_image=cond_image, mask_image=mask, **args)
        srv.terminate()
    assert refused.value.status == 422 and refused.value.field == "mask_image"
    want = instruct_pipe(image=cond_image, init_image=photo, mask_image=mask, strength=0.75, **args)
    assert close(got[0], decode_png(png_base64(want[0])))


def test_the_docs_curl_lines_run_on_tiny_weights(tiny, cond_image, photo, mask, tmp_path):
    """docs/server.md's "From a photo" block: its serve line on the tiny weights, then each curl line as written
    (the URL swapped for the test server's)."""
    import os
    import re
    import shlex
    import subprocess
    from server_utils import REPO, ServerProcess

    text = open(os.path.join(REPO, "docs", "server.md"), encoding="utf-8").read()
    section = text.split("\n## From a photo: img2img and inpainting\n", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```sh\n(.*?)```", section, re.S)[0]
    lines = [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert lines[0] == "python -m engine make-tiny tiny" and lines[1].startswith("python -m engine serve ")
    folder = os.path.dirname(tiny["model"])
    serve = shlex.split(lines[1].rstrip("&").replace("tiny/", folder + "/"))[4:]
    for name, im in (("cond.png", cond_image), ("photo.png", photo), ("mask.png", mask)):
        im.save(tmp_path / name)
    with ServerProcess(serve) as srv:
        for line in lines[2:]:
            argv = shlex.split(line.replace("http://127.0.0.1:8000", srv.url))
            assert argv[0] == "curl", line
            run = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
            assert run.returncode == 0, run.stderr
        srv.terminate()
    assert Image.open(tmp_path / "img2img.png").size == photo.size     # img2img: the photo's size
    assert Image.open(tmp_path / "inpaint.png").size == (64, 64)       # inpainting: the native size
