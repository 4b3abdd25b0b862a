"""No request's numbers reach another request's image (issue 26, part 1), in two independent layers:
- bounds: every float a request sends is within engine/bounds.py's range, else an EngineError (Python API) or a 422
  naming the field (HTTP), per-block scale dicts included;
- construction: each image's noise prediction is gathered from its own rows (guidance.Combination), so with the
  bounds switched off a hostile batch-mate leaves every other image as it is alone (one grey level) and bitwise as
  beside a benign mate of the same shape; the hostile request itself fails alone (guidance.NonFinite).
At the API and over HTTP, request- and step-level batching, generate and edit; tiny weights, 2 steps."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import NEGATIVE, PROMPT, load_pipe
from ipadapter_instruct.engine import bounds
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.combine import Combination, NonFinite
from ipadapter_instruct.engine.server.config import ServerConfig
from server_utils import InProcessServer, decode_png, png_base64

STYLE = "use the style of this image"
EDIT = "make it look like winter"
NAN, INF = float("nan"), float("inf")
# (field, value) refused by the bounds, at the API and over HTTP
OUT_OF_RANGE = [("guidance_scale", 1e308), ("guidance_scale", NAN), ("guidance_scale", -1.0),
                ("instruct_guidance_scale", 1e308), ("image_guidance_scale", INF), ("scale", 1e308),
                ("scale", NAN), ("scale", {"mid": NAN}), ("scale", {"up": {"block_1": [0.0, INF]}}),
                ("scale", {"down": 11.0}), ("adapter_start", NAN), ("adapter_end", 2.0)]
EDIT_OUT_OF_RANGE = [("guidance_scale", 1e308), ("image_guidance_scale", NAN), ("scale", -1e308)]
# hostile batch-mates (bounds off), each beside the same good request, and the benign mate of the same shape (the
# same guidance branches: simple, 2 rows, or full, 4)
HOSTILE = {
    "guidance_scale": {"guidance_scale": 1e308},
    "scale": {"scale": 1e308},
    "scale-dict-nan": {"scale": {"mid": NAN}},
    "instruct_guidance_scale": {"guidance_mode": "full", "instruct_guidance_scale": 1e308},
    "image_guidance_scale": {"guidance_mode": "full", "image_guidance_scale": 1e308},
}
BENIGN = {"simple": {"guidance_scale": 7.0, "scale": {"mid": 0.5}},
          "full": {"guidance_mode": "full", "instruct_guidance_scale": 5.0, "image_guidance_scale": 2.0}}


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=int)


def close(a, b) -> bool:
    return int(np.abs(pixels(a) - pixels(b)).max()) <= 1


def same(a, b) -> bool:
    return np.array_equal(pixels(a), pixels(b))


@pytest.fixture
def unbounded(monkeypatch):
    """The bounds switched off everywhere (API and schemas read them through the module): the second layer alone."""
    monkeypatch.setattr(bounds, "number", lambda field, value, where="": float(value))
    monkeypatch.setattr(bounds, "scale", lambda value, where="", field="scale": value)


def request(image, seed=1, **kw):
    return {"prompt": PROMPT, "negative_prompt": NEGATIVE, "image": image, "instruct": STYLE,
            "num_inference_steps": 2, "seed": seed, **kw}


def batch(pipe, reqs: list[dict]):
    """One call of several requests (per-request lists) -> (outputs, failed request indices)."""
    keys = sorted({k for r in reqs for k in r})
    defaults = {"guidance_mode": "auto", "scale": 0.8, "guidance_scale": 6.0, "instruct_guidance_scale": 6.0,
                "image_guidance_scale": 1.0}
    per = {k: [r.get(k, defaults.get(k)) for r in reqs] for k in keys if k != "num_inference_steps"}
    try:
        return pipe(**per, num_inference_steps=reqs[0]["num_inference_steps"]), []
    except NonFinite as e:
        return e.outputs, e.requests


# ---- the combination itself ------------------------------------------------------------------------------------

def test_each_image_reads_only_its_own_rows():
    # rows 0-1: image 0 (weights 3, -2); rows 2-5: image 1 (full guidance), whose rows are NaN and infinity
    rows = torch.randn(6, 2, 3, 3)
    rows[2], rows[3, 0, 0, 0] = NAN, INF
    comb = Combination.of([0, 0, 1, 1, 1, 1], [3.0, -2.0, 1.0, 1.0, 1.0, 1.0], 2)
    out = comb(rows)
    assert torch.equal(out[0], (3 * rows[0] - 2 * rows[1]).flatten()) and not out[1].isfinite().any()
    dense = torch.zeros(2, 6)  # the former combination, a matrix over every row: 0 x NaN poisons image 0
    dense[0, :2], dense[1, 2:] = torch.tensor([3.0, -2.0]), 1.0
    assert not (dense @ rows.flatten(1))[0].isfinite().all()
    # one request's share (step-level batching) indexes its own rows from 0
    share = comb.select(torch.tensor([0]), torch.tensor([0, 1]))
    assert torch.equal(share(rows[:2]), out[:1]) and not share.padded and comb.padded


# ---- layer 1: bounds -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", OUT_OF_RANGE, ids=[f"{f}={v}" for f, v in OUT_OF_RANGE])
def test_out_of_range_numbers_are_refused_naming_the_field(instruct_pipe, cond_image, field, value):
    with pytest.raises(EngineError, match=field) as e:
        instruct_pipe(**request(cond_image, **{field: value}))
    assert "\n" not in str(e.value)
    with pytest.raises(EngineError, match=field):  # step-level admission: the same rule
        instruct_pipe.start(**request(cond_image, **{field: value}))


def test_controlnet_numbers_are_bounded():
    from ipadapter_instruct.engine.controlnet import control_numbers
    for kw, field in (({"scale": 1e308}, "controlnet_conditioning_scale"), ({"start": NAN}, "control_guidance_start"),
                      ({"end": 1.5}, "control_guidance_end"), ({"start": 0.8, "end": 0.2}, "control_guidance_start")):
        args = {"scale": 1.0, "start": 0.0, "end": 1.0, **kw}
        with pytest.raises(EngineError, match=field):
            control_numbers(1, 2, args["scale"], args["start"], args["end"])
    with pytest.raises(EngineError, match="controlnet_conditioning_scale of request 1"):
        control_numbers(1, 2, [1.0, INF], 0.0, 1.0)


def test_docs_list_every_bound():
    import os
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "server.md"), encoding="utf-8").read()
    section = text.split("## Isolation between requests")[1].split("\n## ")[0]
    for field, span, _ in bounds.table():
        assert f"| `{field}` | {span} |" in section, field


# ---- layer 2: construction, at the Python API ------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_alone(instruct_pipe, cond_image):
    return instruct_pipe(**request(cond_image))[0]


@pytest.fixture(scope="module")
def beside_benign(instruct_pipe, cond_image, other_image):
    """The good request's image beside a benign mate of each shape."""
    out = {}
    for shape, mate in BENIGN.items():
        images, failed = batch(instruct_pipe, [request(cond_image), request(other_image, seed=2, **mate)])
        assert failed == []
        out[shape] = images[0]
    return out


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_batch_mate_leaves_the_other_image_as_it_is(instruct_pipe, cond_image, other_image, good_alone,
                                                              beside_benign, unbounded, name):
    hostile = HOSTILE[name]
    out, failed = batch(instruct_pipe, [request(cond_image), request(other_image, seed=2, **hostile)])
    ref = [beside_benign[hostile.get("guidance_mode", "simple")]]
    assert failed in ([], [1])
    if name == "guidance_scale":  # 1e308 x a prediction is infinity: its own latents go non-finite, it fails alone
        assert failed == [1] and out[1] is None
    assert close(out[0], good_alone) and same(out[0], ref[0])


def fly_together(pipe, first: dict, second: dict):
    """Two flights stepped together to the end -> (outputs, failed flight indices)."""
    flights = [pipe.start(**first), pipe.start(**second)]
    while not flights[0].done:
        pipe.step(flights)
    try:
        return pipe.finish_many(flights), []
    except NonFinite as e:
        return e.outputs, e.requests


def test_in_step_batching_too(instruct_pipe, cond_image, other_image, good_alone, unbounded):
    def run(mate):
        return fly_together(instruct_pipe, request(cond_image), request(other_image, **mate))
    out, failed = run({"guidance_scale": 1e308, "scale": {"mid": NAN}})
    ref, _ = run({"guidance_scale": 7.0, "scale": {"mid": 0.5}})
    assert failed == [1] and out[1] is None
    assert close(out[0][0], good_alone) and same(out[0][0], ref[0][0])


@pytest.fixture(scope="module")
def edit_pipe(tiny_edit):
    from ipadapter_instruct.engine import EditPipeline
    pipe = EditPipeline.from_pretrained(tiny_edit["model"], device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray((np.random.RandomState(0).rand(64, 48, 3) * 255).astype("uint8"))


@pytest.mark.parametrize("field,value", EDIT_OUT_OF_RANGE, ids=[f"{f}={v}" for f, v in EDIT_OUT_OF_RANGE])
def test_edit_numbers_are_bounded(edit_pipe, photo, field, value):
    with pytest.raises(EngineError, match=field):
        edit_pipe(EDIT, photo, num_inference_steps=2, **{field: value})


@pytest.mark.parametrize("field", ["guidance_scale", "image_guidance_scale"])
def test_an_edit_beside_a_hostile_edit(edit_pipe, photo, unbounded, field):
    other = photo.transpose(Image.FLIP_LEFT_RIGHT)
    alone = edit_pipe(EDIT, photo, num_inference_steps=2, seed=1)[0]

    def run(value):
        try:
            return edit_pipe([EDIT, "a painting"], [photo, other], num_inference_steps=2, seed=[1, 2],
                             **{field: [7.5 if field == "guidance_scale" else 1.5, value]}), []
        except NonFinite as e:
            return e.outputs, e.requests
    out, failed = run(1e308)
    ref, _ = run(3.0)
    assert failed == [1] and close(out[0], alone) and same(out[0], ref[0])


def test_an_edit_flight_beside_a_hostile_flight(edit_pipe, photo, unbounded):
    other = photo.transpose(Image.FLIP_LEFT_RIGHT)
    alone = edit_pipe(EDIT, photo, num_inference_steps=2, seed=1)[0]

    def run(value):
        return fly_together(edit_pipe, dict(prompt=EDIT, image=photo, num_inference_steps=2, seed=1),
                            dict(prompt="a painting", image=other, num_inference_steps=2, seed=2,
                                 image_guidance_scale=value))
    out, failed = run(1e308)
    ref, _ = run(3.0)
    assert failed == [1] and close(out[0][0], alone) and same(out[0][0], ref[0][0])


def test_a_controlnet_scale_cannot_reach_a_batch_mate(tiny, tmp_path, unbounded):
    from test_controlnet import make_controlnet

    from ipadapter_instruct.engine import Pipeline
    pipe = Pipeline.from_pretrained(tiny["model"], device="cpu", controlnet=make_controlnet(tiny, tmp_path / "cn", 0))
    pipe.set_progress_bar_config(disable=True)
    control = Image.fromarray((np.random.RandomState(1).rand(64, 64, 3) * 255).astype("uint8"))
    kw = dict(num_inference_steps=2, seed=[1, 2], control_image=control)
    alone = pipe(PROMPT, num_inference_steps=2, seed=1, control_image=control)[0]
    with pytest.raises(NonFinite) as e:
        pipe([PROMPT, "a castle"], controlnet_conditioning_scale=[1.0, 1e308], **kw)
    ref = pipe([PROMPT, "a castle"], controlnet_conditioning_scale=[1.0, 2.0], **kw)
    assert e.value.requests == [1] and "request 1" in str(e.value)
    assert close(e.value.outputs[0], alone) and same(e.value.outputs[0], ref[0])


# ---- over HTTP: one batch of a good and a hostile request ----------------------------------------------------

@pytest.fixture(scope="module", params=["request", "step"])
def server(request, tiny):
    srv = InProcessServer(ServerConfig(max_wait_ms=1500, batching=request.param), load_pipe(tiny, tiny["adapter"]))
    yield srv
    srv.close()


def body(image, **kw):
    return {"prompt": PROMPT, "negative_prompt": NEGATIVE, "image": png_base64(image), "instruct": STYLE,
            "num_inference_steps": 2, "seed": 1, **kw}


def post(server, path: str, data: dict):
    """JSON with NaN and Infinity as Python writes them (httpx's json= refuses them; the server reads them)."""
    return server.request("POST", path, content=json.dumps(data), headers={"content-type": "application/json"})


def test_http_refuses_out_of_range_numbers_with_422_naming_the_field(server, cond_image):
    cases = OUT_OF_RANGE + [("controlnet_conditioning_scale", 1e308)]
    for field, value in cases:
        r = post(server, "/v1/generate", body(cond_image, **{field: value}))
        assert r.status_code == 422, (field, value, r.text)
        assert r.json()["error"]["field"] == field, (field, value, r.json())
    assert server.state.batcher.queue == []


def test_http_a_hostile_request_in_the_same_batch_fails_alone(server, cond_image, other_image, unbounded):
    steps = 2 if server.state.config.batching == "request" else 5  # step mode: the mate joins while it runs
    good = body(cond_image, num_inference_steps=steps)
    hostile = body(other_image, seed=2, guidance_scale=1e308, scale={"mid": NAN})
    answers = server.concurrently(("POST", "/v1/generate", {"json": good}),
                                  ("POST", "/v1/generate", {"content": json.dumps(hostile),
                                                            "headers": {"content-type": "application/json"}}))
    assert answers[0].status_code == 200, answers[0].text
    assert answers[0].json()["timings"]["batch_requests"] == 2, answers[0].json()["timings"]
    assert answers[1].status_code == 422 and "non-finite" in answers[1].json()["error"]["message"], answers[1].text
    alone = server.state.pipe(**request(cond_image, num_inference_steps=steps))[0]
    assert close(decode_png(answers[0].json()["images"][0]), alone)
    assert server.request("POST", "/v1/generate", json=good).status_code == 200  # and it keeps serving


@pytest.mark.parametrize("batching", ["request", "step"])
def test_http_edit_numbers_and_a_hostile_edit(tiny_edit, photo, monkeypatch, batching):
    srv = InProcessServer(ServerConfig(model=tiny_edit["model"], device="cpu", max_wait_ms=1500, batching=batching),
                          None)
    try:
        steps = 2 if batching == "request" else 5  # step mode: the hostile edit joins while this one runs
        good = {"prompt": EDIT, "image": png_base64(photo), "num_inference_steps": steps, "seed": 1}
        for field, value in EDIT_OUT_OF_RANGE:
            r = post(srv, "/v1/edit", {**good, field: value})
            assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text
        monkeypatch.setattr(bounds, "number", lambda field, value, where="": float(value))
        hostile = {**good, "seed": 2, "num_inference_steps": 2, "image_guidance_scale": 1e308}
        answers = srv.concurrently(("POST", "/v1/edit", {"json": good}), ("POST", "/v1/edit", {"json": hostile}))
        assert answers[0].status_code == 200 and answers[0].json()["timings"]["batch_requests"] == 2, answers[0].text
        assert answers[1].status_code == 422, answers[1].text
        alone = srv.state.pipe(EDIT, photo, num_inference_steps=steps, seed=1)[0]
        assert close(decode_png(answers[0].json()["images"][0]), alone)
    finally:
        srv.close()


def test_bounds_are_finite_and_documented_with_a_reason():
    for field, b in bounds.BOUNDS.items():
        assert math.isfinite(b.low) and math.isfinite(b.high) and b.low < b.high and b.why, field
