"""The real `python -m engine serve` on a free 127.0.0.1 port, driven by concurrent clients: batching seen in
/metrics, results equal to `Pipeline` alone, bad input answered while a valid request is in flight, a client
that goes away dropped from the queue, SIGTERM drain. Plus the CLI's own checks before anything loads."""
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import NEGATIVE, PROMPT
from server_utils import REPO, ServerProcess, metric, png_base64, tiny_args

from ipadapter_instruct.engine.client import Client, ServerError

STYLE = "use the style of this image"
LONG_STEPS = 250  # a request that runs for seconds here (about 15 ms a step), so others meet it in flight


@pytest.fixture(scope="module")
def server(tiny):
    with ServerProcess([*tiny_args(tiny), "--max-wait-ms", "400", "--max-upload-mb", "0.5",
                        "--max-pixels", "40000", "--max-batch-rows", "8"]) as srv:
        yield srv


def in_thread(fn, *args, **kwargs):
    out = {}

    def run():
        try:
            out["value"] = fn(*args, **kwargs)
        except Exception as e:  # handed to the test
            out["error"] = e
    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_concurrent_clients_are_batched_and_each_equals_the_pipeline_alone(server, instruct_pipe, cond_image):
    before_count = metric(server.url, "engine_batch_requests_count")
    before_single = metric(server.url, "engine_batch_requests_bucket", '{le="1.0"}')
    seeds = [11, 12, 13]
    client = Client(server.url)
    threads = [in_thread(client.generate, prompt=PROMPT, negative_prompt=NEGATIVE, image=cond_image, instruct=STYLE,
                         num_inference_steps=2, seed=s) for s in seeds]
    for t, _ in threads:
        t.join(120)
    results = [out["value"][0] for _, out in threads]
    calls = metric(server.url, "engine_batch_requests_count") - before_count
    single = metric(server.url, "engine_batch_requests_bucket", '{le="1.0"}') - before_single
    assert calls < len(seeds) and single < calls, "no call held more than one request"
    for seed, got in zip(seeds, results):
        want = instruct_pipe(prompt=PROMPT, negative_prompt=NEGATIVE, image=cond_image, instruct=STYLE,
                             num_inference_steps=2, seed=seed)[0]
        assert np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int)).max() <= 1


def test_bad_input_is_answered_while_a_valid_request_completes(server, cond_image, tmp_path):
    long = {"prompt": PROMPT, "image": png_base64(cond_image), "instruct": STYLE, "num_inference_steps": LONG_STEPS,
            "scheduler": "ddim"}
    t, out = in_thread(httpx.post, server.url + "/v1/generate", json=long, timeout=120)
    time.sleep(0.6)  # the long request is queued or running now
    url = server.url + "/v1/generate"
    bomb = Image.new("RGB", (4000, 4000))  # 16 M pixels, compresses to a few KB: refused from its header
    cases = [
        (httpx.post(url, json={**long, "steps": 3}), 422, "steps"),
        (httpx.post(url, json={**long, "height": 33}), 422, "height"),
        (httpx.post(url, json={**long, "image": png_base64(bomb)}), 413, "ip_adapter_image"),  # (image: its old name)
        (httpx.post(url, json={**long, "image": "aGVsbG8gd29ybGQ="}), 422, "ip_adapter_image"),  # "hello world"
        (httpx.post(url, content=b"x" * (600 * 1024), headers={"content-type": "application/json"}), 413, None),
        (httpx.post(url, files={"image": ("a.png", b"%PDF-1.4 not an image", "image/png")},
                    data={"instruct": STYLE}), 422, "ip_adapter_image"),
        (httpx.post(url, content=b"{}", headers={"content-type": "application/xml"}), 415, "content-type"),
    ]
    assert t.is_alive(), "the valid request finished before the bad ones were answered"
    for r, status, field in cases:
        assert r.status_code == status, r.text
        assert r.json()["error"].get("field") == field and r.json()["request_id"]
    t.join(120)
    assert out["value"].status_code == 200, out
    assert len(out["value"].json()["images"]) == 1
    with pytest.raises(ServerError) as e:
        Client(server.url).generate(prompt="x", image=cond_image, instruct=STYLE, num_inference_steps=0)
    assert e.value.status == 422 and e.value.field == "num_inference_steps"


def test_a_client_that_goes_away_is_dropped_from_the_queue(server, cond_image):
    long = {"prompt": PROMPT, "image": png_base64(cond_image), "instruct": STYLE, "num_inference_steps": LONG_STEPS,
            "scheduler": "ddim", "height": 48, "width": 48}
    t, out = in_thread(httpx.post, server.url + "/v1/generate", json=long, timeout=120)
    time.sleep(0.6)
    other = {**long, "num_inference_steps": 5}  # another key: it waits behind the long one
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/generate", json=other, timeout=0.5)
    t.join(120)
    assert out["value"].status_code == 200
    deadline = time.monotonic() + 10
    while "dropped from the queue" not in server.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "dropped from the queue" in server.output()


def test_sigterm_drains_then_exits_zero(tiny, cond_image):
    with ServerProcess(tiny_args(tiny)) as srv:
        long = {"prompt": PROMPT, "image": png_base64(cond_image), "instruct": STYLE, "num_inference_steps": LONG_STEPS,
                "scheduler": "ddim"}
        t, out = in_thread(httpx.post, srv.url + "/v1/generate", json=long, timeout=120)
        time.sleep(0.6)
        srv.proc.send_signal(15)
        time.sleep(0.3)
        assert httpx.get(srv.url + "/ready").status_code == 503
        refused = httpx.post(srv.url + "/v1/generate", json=long)
        assert refused.status_code == 503 and refused.headers["retry-after"]
        t.join(120)
        assert out["value"].status_code == 200, out   # the request in flight finished
        assert srv.proc.wait(60) == 0
        assert "draining" in srv.output()


def test_cli_refuses_bad_arguments_before_loading(tmp_path, tiny):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "engine", "serve", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=60)

    r = run()
    assert r.returncode == 2 and "--model" in r.stderr and "--tiny" in r.stderr
    r = run("--tiny", "--model", "x")
    assert r.returncode == 2 and "--tiny takes no --model" in r.stderr
    r = run("--model", str(tmp_path / "missing"))
    assert r.returncode == 1 and r.stderr.strip() == f"error: model folder not found: {tmp_path / 'missing'}"
    empty = tmp_path / "key"
    empty.write_text("")
    r = run("--model", tiny["model"], "--api-key-file", str(empty))  # a model that passes the pre-flight checks
    assert r.returncode == 1 and "API key file" in r.stderr and "empty" in r.stderr
    r = run("--model", tiny["model"], "--replicas", "2")
    assert r.returncode == 2 and "--ray" in r.stderr


def test_async_client_equals_the_sync_client(server, cond_image, tmp_path):
    import asyncio

    from ipadapter_instruct.engine.client import AsyncClient

    path = tmp_path / "cond.png"
    cond_image.save(path)
    args = dict(prompt=PROMPT, instruct=STYLE, num_inference_steps=2, seed=21, num_images_per_prompt=2)
    sync = Client(server.url).generate(image=str(path), **args)   # a path, read on the client side
    client = AsyncClient(server.url)
    out = asyncio.run(client.generate(image=cond_image, **args))
    assert len(out) == 2 and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(sync, out))
    assert client.last_result["seed"] == 21 and client.last_result["timings"]["batch_rows"] == 4
    assert sync.seed == out.seed == 21 and sync.seeds == out.seeds == [21, 22]  # image j: seed + j
    assert asyncio.run(client.ready()) and asyncio.run(client.models())["data"][0]["adapter_kind"] == "instruct"
    with pytest.raises(TypeError, match="unknown argument"):
        Client(server.url).generate(prompt="x", colour="red")


def test_the_client_returns_the_seed_and_takes_the_new_and_old_names(server, cond_image):
    client = Client(server.url)
    args = dict(prompt=PROMPT, instruct=STYLE, num_inference_steps=2)
    first = client.generate(ip_adapter_image=cond_image, **args)   # no seed: the server draws one
    assert isinstance(first.seed, int) and first.seeds == [first.seed] and first.images == list(first)
    assert first.request_id and first.timings["batch_rows"] == 2
    again = client.generate(image=cond_image, seed=first.seed, **args)   # `image`: the old name
    assert again.seed == first.seed and np.array_equal(np.asarray(again[0]), np.asarray(first[0]))
    assert client.generate(PROMPT, cond_image, STYLE, num_inference_steps=2).seed != first.seed  # positional
    with pytest.raises(TypeError, match="ip_adapter_image or its old name image, not both"):
        client.generate(ip_adapter_image=cond_image, image=cond_image, **args)


def test_a_missing_image_file_is_the_clients_own_one_line_error_before_any_request(tmp_path, cond_image):
    import asyncio

    from ipadapter_instruct.engine.client import AsyncClient, ClientError

    missing = tmp_path / "nope.png"
    url = "http://127.0.0.1:9"   # nothing listens there: a request would raise httpx's error instead
    calls = {"ip_adapter_image": lambda: Client(url).generate(ip_adapter_image=str(missing), instruct=STYLE),
             "image": lambda: Client(url).edit("make it winter", missing),
             "adapter_image": lambda: Client(url).edit("make it winter", cond_image, adapter_image=missing),
             "async": lambda: asyncio.run(AsyncClient(url).generate(image=missing))}
    for name, call in calls.items():
        with pytest.raises(ClientError) as e:
            call()
        message = str(e.value)
        assert str(missing) in message and "\n" not in message and not isinstance(e.value, ServerError), name


def test_limits_are_answered_while_a_valid_request_completes(tiny, cond_image, tmp_path):
    # the rest of the error list on a real process: 401 (API key), 504 (deadline while queued) and 429 (queue
    # full), all while one valid request runs and then completes
    key = tmp_path / "key"
    key.write_text("k3y\n")
    args = [*tiny_args(tiny), "--api-key-file", str(key), "--max-queue", "1", "--max-batch-rows", "2",
            "--request-timeout-s", "1"]
    auth = {"authorization": "Bearer k3y"}
    with ServerProcess(args) as srv:
        url = srv.url + "/v1/generate"
        long = {"prompt": PROMPT, "image": png_base64(cond_image), "instruct": STYLE,
                "num_inference_steps": LONG_STEPS, "scheduler": "ddim"}
        t, out = in_thread(httpx.post, url, json=long, headers=auth, timeout=120)
        time.sleep(0.6)
        assert httpx.post(url, json=long).status_code == 401
        assert httpx.post(url, json=long, headers={"authorization": "Bearer nope"}).status_code == 401
        short = {**long, "num_inference_steps": 2}
        queued, waited = in_thread(httpx.post, url, json=short, headers=auth, timeout=30)
        time.sleep(0.3)
        full = httpx.post(url, json=short, headers=auth)
        assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full" and full.headers["retry-after"]
        queued.join(30)
        assert waited["value"].status_code == 504 and waited["value"].json()["error"]["code"] == "deadline_exceeded"
        assert t.is_alive(), "the valid request finished before the limits were answered"
        t.join(120)
        assert out["value"].status_code == 200
        statuses = httpx.get(srv.url + "/metrics").text
        for status in ("200", "401", "429", "504"):
            assert f'engine_requests_total{{status="{status}"}}' in statuses


def test_a_model_that_cannot_load_stops_the_server_with_one_line(tmp_path):
    (tmp_path / "unet").mkdir()  # a folder, but not a diffusers model
    r = subprocess.run([sys.executable, "-m", "engine", "serve", "--model", str(tmp_path), "--port", "0"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "could not load the model" in r.stderr
    r = subprocess.run([sys.executable, "-m", "engine", "serve", "--tiny", "--device", "cpu", "--cuda-graphs"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--cuda-graphs needs a CUDA device" in r.stderr
