"""The HTTP API in process (httpx's ASGI transport, the app's own lifespan): results equal `Pipeline` alone,
batching, the conditioning cache, streaming, and every bad input as a JSON error while the server keeps serving."""
import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from ipadapter_instruct.engine.server.config import ServerConfig

from conftest import NEGATIVE, PROMPT, gpu, load_pipe
from server_utils import InProcessServer, decode_png, png_base64

STYLE = "use the style of this image"
COMPOSITION = "use the composition of this image"


@pytest.fixture(scope="module")
def server(tiny):
    srv = InProcessServer(ServerConfig(max_wait_ms=300, max_upload_mb=1, max_pixels=200 * 200),
                          load_pipe(tiny, tiny["adapter"]))
    yield srv
    srv.close()


def body(image, **kw):
    return {"prompt": PROMPT, "negative_prompt": NEGATIVE, "ip_adapter_image": png_base64(image), "instruct": STYLE,
            "num_inference_steps": 2, **kw}


def alone(pipe, image, **kw):
    """What Pipeline gives for one request alone, as the PNG round trip the server's answer went through."""
    args = dict(prompt=PROMPT, negative_prompt=NEGATIVE, image=image, instruct=STYLE, num_inference_steps=2, seed=0)
    args.update(kw)
    out = pipe(**args)
    return [Image.open(io.BytesIO(base64.b64decode(png_base64(im)))).convert("RGB") for im in out]


def close(a: Image.Image, b: Image.Image, grey_levels=1) -> bool:
    return int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max()) <= grey_levels


def error_of(r, status, field=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["code"] and r.json()["request_id"] == r.headers["x-request-id"]
    if field is not None:
        assert err.get("field") == field, err
    return err


def test_one_request_equals_the_pipeline_alone(server, instruct_pipe, cond_image):
    r = server.request("POST", "/v1/generate", json=body(cond_image, seed=3))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["seed"] == 3 and len(out["images"]) == 1 and out["request_id"] == r.headers["x-request-id"]
    for key in ("queue_ms", "compute_ms", "batch_requests", "batch_rows", "unet_ms_per_step", "vae_decode_ms"):
        assert key in out["timings"]
    assert out["timings"]["batch_rows"] == 2  # simple guidance ("style"): two UNet rows
    assert close(decode_png(out["images"][0]), alone(instruct_pipe, cond_image, seed=3)[0])


def test_different_requests_share_one_call_and_each_equals_itself_alone(server, instruct_pipe, cond_image, other_image):
    reqs = [body(cond_image, seed=1),
            body(other_image, seed=2, instruct=COMPOSITION, scale=0.5),                 # full guidance: 4 rows
            body(cond_image, seed=3, prompt="a castle", guidance_mode="full", scale={"up": {"block_1": [0.0, 1.0]}})]
    answers = server.concurrently(*[("POST", "/v1/generate", {"json": b}) for b in reqs])
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    timings = [a.json()["timings"] for a in answers]
    assert max(t["batch_requests"] for t in timings) > 1, timings
    expected = [alone(instruct_pipe, cond_image, seed=1),
                alone(instruct_pipe, other_image, seed=2, instruct=COMPOSITION, scale=0.5),
                alone(instruct_pipe, cond_image, seed=3, prompt="a castle", guidance_mode="full",
                      scale={"up": {"block_1": [0.0, 1.0]}})]
    for a, e in zip(answers, expected):
        assert close(decode_png(a.json()["images"][0]), e[0])


def test_requests_of_other_sizes_or_steps_run_in_their_own_calls(server, cond_image):
    answers = server.concurrently(("POST", "/v1/generate", {"json": body(cond_image)}),
                                  ("POST", "/v1/generate", {"json": body(cond_image, num_inference_steps=3)}),
                                  ("POST", "/v1/generate", {"json": body(cond_image, height=32, width=48)}))
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.json()["timings"]["batch_requests"] for a in answers] == [1, 1, 1]
    assert decode_png(answers[2].json()["images"][0]).size == (48, 32)


def test_num_images_and_the_png_answer(server, cond_image):
    r = server.request("POST", "/v1/generate", json=body(cond_image, num_images_per_prompt=2, seed=4))
    assert r.status_code == 200 and len(r.json()["images"]) == 2 and r.json()["timings"]["batch_rows"] == 4
    png = server.request("POST", "/v1/generate", json=body(cond_image, seed=4), headers={"accept": "image/png"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.headers["x-seed"] == "4"
    # image 0 of a 4-row call against the same request alone (2 rows): a different batch shape takes other GEMM
    # blockings, so the latents may differ by rounding (~7e-6 seen with 2 threads): one grey level, as batch-vs-alone
    assert close(Image.open(io.BytesIO(png.content)).convert("RGB"), decode_png(r.json()["images"][0]))


def test_multipart_upload_equals_json(server, cond_image):
    buf = io.BytesIO()
    cond_image.save(buf, format="PNG")
    form = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "instruct": STYLE, "num_inference_steps": "2",
            "seed": "5", "scale": json.dumps({"up": {"block_1": 0.7}})}
    r = server.request("POST", "/v1/generate", data=form, files={"image": ("cond.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200, r.text
    j = server.request("POST", "/v1/generate", json=body(cond_image, seed=5, scale={"up": {"block_1": 0.7}}))
    assert close(decode_png(r.json()["images"][0]), decode_png(j.json()["images"][0]), 0)


def test_cache_hits_give_identical_images_and_show_in_metrics(server, tiny, other_image):
    def hits(kind):
        text = server.request("GET", "/metrics").text
        line = f'engine_cache_lookups_total{{kind="{kind}",result="hit"}}'
        return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(line))

    noise = Image.fromarray(np.random.default_rng(7).integers(0, 255, (48, 40, 3), dtype=np.uint8))
    before = hits("image"), hits("text")
    first = server.request("POST", "/v1/generate", json=body(noise, prompt="never seen before", seed=9))
    again = server.request("POST", "/v1/generate", json=body(noise, prompt="never seen before", seed=9))
    assert first.status_code == again.status_code == 200
    assert first.json()["images"] == again.json()["images"]  # bitwise: the hit returns what the miss stored
    assert hits("image") == before[0] + 1 and hits("text") >= before[1] + 2


def test_streaming_events(server, cond_image):
    r = server.request("POST", "/v1/generate", json=body(cond_image, stream=True, num_inference_steps=3, scheduler="ddim"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [(f.split("\n")[0].removeprefix("event: "), json.loads(f.split("\n")[1].removeprefix("data: ")))
              for f in r.text.strip().split("\n\n")]
    names = [e for e, _ in events]
    assert names[0] == "queued" and names[-1] == "result"
    assert [(d["step"], d["total"]) for e, d in events if e == "progress"] == [(1, 3), (2, 3), (3, 3)]
    assert len(events[-1][1]["images"]) == 1
    accept = server.request("POST", "/v1/generate", json=body(cond_image), headers={"accept": "text/event-stream"})
    assert "event: result" in accept.text


def test_health_ready_models_metrics_docs(server):
    assert server.request("GET", "/health").json() == {"status": "ok"}
    assert server.request("GET", "/ready").json()["ready"] is True
    card = server.request("GET", "/v1/models").json()["data"][0]
    assert card["adapter_kind"] == "instruct" and card["device"] == "cpu" and card["dtype"] == "float32"
    assert card["native_size"] == 64 and card["vae_scale_factor"] == 4
    metrics = server.request("GET", "/metrics").text
    for name in ("engine_requests_total", "engine_queue_depth", "engine_batch_rows_bucket",
                 "engine_queue_wait_seconds_bucket", "engine_compute_seconds_bucket", "engine_images_per_second"):
        assert name in metrics
    spec = server.request("GET", "/openapi.json").json()
    assert "/v1/generate" in spec["paths"] and "GenerateRequest" in json.dumps(spec)
    assert server.request("GET", "/docs").status_code == 200
    assert "<html" in server.request("GET", "/").text.lower()


@pytest.mark.parametrize("change, field", [
    ({"colour": 1}, "colour"),                          # unknown field
    ({"num_inference_steps": "many"}, "num_inference_steps"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 100000}, "num_inference_steps"),
    ({"num_images_per_prompt": 9}, "num_images_per_prompt"),
    ({"num_images": 0}, "num_images_per_prompt"),                   # (its old name)
    ({"height": 30}, "height"),                          # off the VAE grid (factor 4)
    ({"width": 100000}, "width"),                        # over the size limit
    ({"scheduler": "lms"}, "scheduler"),
    ({"guidance_mode": "loud"}, "guidance_mode"),
    ({"guidance_scale": "NaN"}, "guidance_scale"),
    ({"scale": "strong"}, "scale"),
    ({"scale": {"sideways": 1.0}}, "scale"),
    ({"instruct": "  "}, "instruct"),
    ({"ip_adapter_image": None}, "ip_adapter_image"),
    ({"ip_adapter_image": "not base64!"}, "ip_adapter_image"),
    ({"ip_adapter_image": base64.b64encode(b"GIF89a" + bytes(64)).decode()}, "ip_adapter_image"),   # sniffed: not PNG/JPEG/WebP
    ({"ip_adapter_image": base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(40)).decode()}, "ip_adapter_image"),  # corrupt PNG
    ({"seed": -1}, "seed"),
    ({"ip_adapter_image": "/etc/hostname"}, "ip_adapter_image"),              # never a path to read...
    ({"ip_adapter_image": "https://example.com/cond.png"}, "ip_adapter_image"),  # ...nor a URL to fetch
])
def test_bad_fields_are_422_naming_the_field(server, cond_image, change, field):
    r = server.request("POST", "/v1/generate", json={**body(cond_image), **change})
    error_of(r, 422, field)


def test_bad_bodies(server, cond_image):
    error_of(server.request("POST", "/v1/generate", content=b"{not json", headers={"content-type": "application/json"}), 422)
    error_of(server.request("POST", "/v1/generate", content=b"[1, 2]", headers={"content-type": "application/json"}), 422)
    error_of(server.request("POST", "/v1/generate", content=b"x", headers={"content-type": "text/plain"}), 415)
    error_of(server.request("GET", "/v1/nothing"), 404)
    error_of(server.request("GET", "/v1/generate"), 405)


def test_too_large_bodies_and_images_are_413(server, cond_image):
    big = Image.new("RGB", (300, 300), (9, 9, 9))   # 90 000 pixels, over --max-pixels 40 000
    error_of(server.request("POST", "/v1/generate", json=body(big)), 413, "ip_adapter_image")
    pad = {"prompt": "x" * 100, "negative_prompt": "y", "image": "A" * (1024 * 1024 + 10)}
    error_of(server.request("POST", "/v1/generate", json=pad), 413)              # refused from Content-Length

    async def chunks():                                                      # no Content-Length: refused while read
        yield b'{"image": "'
        for _ in range(40):
            yield b"A" * 65536
    error_of(server.request("POST", "/v1/generate", content=chunks(), headers={"content-type": "application/json"}), 413)
    assert server.request("POST", "/v1/generate", json=body(cond_image)).status_code == 200  # still serving


def test_a_failing_batch_fails_only_its_bad_request(server, cond_image, monkeypatch):
    runner = server.state.runner
    real = type(runner).__call__

    def flaky(self, works, progress=None):
        if any(w.req.prompt == "boom" for w in works):
            raise RuntimeError("simulated failure inside the model")
        return real(self, works, progress)
    monkeypatch.setattr(type(runner), "__call__", flaky)
    answers = server.concurrently(("POST", "/v1/generate", {"json": body(cond_image, seed=1)}),
                                  ("POST", "/v1/generate", {"json": body(cond_image, prompt="boom")}),
                                  ("POST", "/v1/generate", {"json": body(cond_image, seed=2)}))
    assert [a.status_code for a in answers] == [200, 500, 200]
    err = error_of(answers[1], 500)   # the detail is in the log, not the answer
    assert err["code"] == "internal" and answers[1].json()["request_id"] in err["message"]
    assert "simulated failure" not in err["message"]
    monkeypatch.undo()
    assert server.request("POST", "/v1/generate", json=body(cond_image)).status_code == 200


def test_api_key_and_cors(tiny, tmp_path, cond_image, instruct_pipe):
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    srv = InProcessServer(ServerConfig(api_key_file=str(key), cors_origin="http://app.example", warmup=False),
                          load_pipe(tiny, tiny["adapter"]))
    try:
        error_of(srv.request("POST", "/v1/generate", json=body(cond_image)), 401)
        error_of(srv.request("GET", "/v1/models", headers={"authorization": "Bearer wrong"}), 401)
        ok = srv.request("GET", "/v1/models", headers={"authorization": "Bearer s3cret",
                                                        "origin": "http://app.example"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://app.example"
        other = srv.request("GET", "/health", headers={"origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        assert srv.request("GET", "/metrics").status_code == 200   # probes and metrics stay open
    finally:
        srv.close()


def test_cors_is_off_by_default(server):
    r = server.request("GET", "/health", headers={"origin": "http://app.example"})
    assert "access-control-allow-origin" not in r.headers


def test_queue_full_is_429_and_a_deadline_passed_in_the_queue_is_504(tiny, cond_image):
    # one request per call, one waiting at most, and a short deadline: while a long request runs, the next one
    # waits (and times out, never reaching the model), the one after finds the queue full
    srv = InProcessServer(ServerConfig(max_batch_rows=2, max_queue=1, request_timeout_s=0.5, max_wait_ms=0,
                                       warmup=False), load_pipe(tiny, tiny["adapter"]))
    try:
        slow = body(cond_image, num_inference_steps=250, scheduler="ddim")  # seconds here

        async def until(done, what):  # the batcher's own state, not a guess at how long a loaded machine takes
            import asyncio
            for _ in range(2000):
                if done():
                    return
                await asyncio.sleep(0.01)
            raise TimeoutError(what)

        async def scenario():
            import asyncio
            batcher = srv.state.batcher
            first = asyncio.ensure_future(srv.client.post("/v1/generate", json=slow))
            await until(lambda: batcher.running, "the slow request never started")
            queued = asyncio.ensure_future(srv.client.post("/v1/generate", json=body(cond_image)))
            await until(lambda: batcher.queue, "the second request never queued")
            full = await srv.client.post("/v1/generate", json=body(cond_image))
            return await first, await queued, full

        first, queued, full = srv.call(scenario())
        assert first.status_code == 200, first.text
        error_of(queued, 504)
        assert queued.json()["error"]["code"] == "deadline_exceeded"
        error_of(full, 429)
        assert int(full.headers["retry-after"]) >= 1
        calls = srv.request("GET", "/metrics").text
        assert "engine_batch_requests_count 1.0" in calls   # the timed-out request never ran
    finally:
        srv.close()


def test_a_server_without_adapter_is_text_to_image(tiny, cond_image):
    from ipadapter_instruct.engine import Pipeline

    pipe = Pipeline.from_pretrained(tiny["model"], device="cpu")
    srv = InProcessServer(ServerConfig(), pipe)   # warms up too: a text-only request
    try:
        r = srv.request("POST", "/v1/generate", json={"prompt": PROMPT, "num_inference_steps": 2, "seed": 1})
        assert r.status_code == 200, r.text
        want = pipe(prompt=PROMPT, num_inference_steps=2, seed=1)[0]
        assert close(decode_png(r.json()["images"][0]), want)
        error_of(srv.request("POST", "/v1/generate", json={"ip_adapter_image": png_base64(cond_image)}), 422,
                 "ip_adapter_image")
        error_of(srv.request("POST", "/v1/generate", json={"instruct": STYLE}), 422, "instruct")
        assert srv.request("GET", "/v1/models").json()["data"][0]["adapter_kind"] is None
    finally:
        srv.close()


def test_compile_and_cuda_graphs_reach_the_pipeline(tiny):
    pipe = load_pipe(tiny, tiny["adapter"])
    calls = []
    pipe.compile = lambda **kw: calls.append("compile")
    pipe.enable_cuda_graphs = lambda: calls.append("cuda_graphs")
    srv = InProcessServer(ServerConfig(compile=True, cuda_graphs=True, warmup=False), pipe)
    srv.close()
    assert calls == ["compile", "cuda_graphs"]


@gpu
def test_cuda_graphs_server_equals_the_eager_server(tiny, cond_image):
    # the fast path behind the server: a batch of two requests through captured graphs gives the eager images
    from ipadapter_instruct.engine import Pipeline

    def serve(**kw):
        pipe = Pipeline.from_pretrained(tiny["model"], image_encoder=tiny["image_encoder"], adapter=tiny["adapter"],
                                        device="cuda", dtype="float32")
        srv = InProcessServer(ServerConfig(max_wait_ms=300, **kw), pipe)
        try:
            answers = srv.concurrently(*[("POST", "/v1/generate", {"json": body(cond_image, seed=s)}) for s in (1, 2)])
            return [decode_png(a.json()["images"][0]) for a in answers]
        finally:
            srv.close()

    for a, b in zip(serve(), serve(cuda_graphs=True)):
        assert close(a, b)
