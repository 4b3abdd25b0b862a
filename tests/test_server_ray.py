"""The server under Ray Serve: one replica on a local Ray instance (2 CPUs, no GPU) answers through Serve's HTTP
proxy as the plain server does, and its image is the one `Pipeline` gives for the same request alone."""
import os
import shutil
import socket
import tempfile
import time

import httpx
import numpy as np
import pytest

from conftest import PROMPT
from server_utils import decode_png, png_base64

INSTRUCT = "use the style of this image"
STEPS, SEED = 2, 3
READY_TIMEOUT_S = 60
# ray 2.60 under pydantic 2: its own Field(update_type=...) deprecations, nothing of ours
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")


def import_ray():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        import ray
        from ray import serve
    except ImportError as e:
        if os.environ.get("CI"):  # `make test` installs ray[serve] through the dev extra: missing is a failure
            pytest.fail(f"ray[serve] is not installed ({e}); the dev extra should install it")
        pytest.skip(f"ray[serve] is not installed ({e}): pip install 'ray[serve]'")
    return ray, serve


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url(tiny):
    ray, serve = import_ray()
    from ipadapter_instruct.engine.server.config import ServerConfig
    from ipadapter_instruct.engine.server.ray_app import build

    port = free_port()
    config = ServerConfig(model=tiny["model"], image_encoder=tiny["image_encoder"], adapter=tiny["adapter"],
                          host="127.0.0.1", port=port, device="cpu", max_batch_rows=8)
    url = f"http://127.0.0.1:{port}"
    # a session folder of its own, removed after (under /tmp: Ray's socket paths must stay short)
    temp_dir = tempfile.mkdtemp(prefix="ray-test-", dir="/tmp")
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=100 * 1024**2,
             log_to_driver=False, _temp_dir=temp_dir)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(config, replicas=1, gpus_per_replica=0), name="engine-test", route_prefix="/")
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            r = httpx.get(url + "/ready", timeout=10)
            if r.status_code == 200:
                break
            assert time.monotonic() < deadline, f"/ready still {r.status_code} after {READY_TIMEOUT_S} s: {r.text}"
            assert not (r.headers.get("content-type") == "application/json" and r.json().get("error")), r.text
            time.sleep(0.2)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_serve_matches_pipeline(ray_url, instruct_pipe, cond_image):
    body = {"prompt": PROMPT, "image": png_base64(cond_image), "instruct": INSTRUCT,
            "num_inference_steps": STEPS, "seed": SEED}
    r = httpx.post(ray_url + "/v1/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["x-engine-replica"] and r.headers["x-request-id"] == r.json()["request_id"]
    images = r.json()["images"]
    assert len(images) == 1
    served = np.asarray(decode_png(images[0]), dtype=np.int16)

    alone = instruct_pipe(prompt=PROMPT, image=decode_png(png_base64(cond_image)), instruct=INSTRUCT,
                          num_inference_steps=STEPS, seed=SEED)[0]
    expected = np.asarray(alone.convert("RGB"), dtype=np.int16)
    assert served.shape == expected.shape
    assert np.abs(served - expected).max() <= 1

    # no seed: the replica draws one and answers it (seed, x-seed through Serve's proxy); sent back, the same image
    del body["seed"]
    first = httpx.post(ray_url + "/v1/generate", json=body, timeout=60)
    assert first.status_code == 200, first.text
    seed = first.json()["seed"]
    assert first.headers["x-seed"] == str(seed) and seed != SEED
    body["ip_adapter_image"] = body.pop("image")  # (image: its old name)
    again = httpx.post(ray_url + "/v1/generate", json={**body, "seed": seed}, timeout=60)
    assert again.json()["images"] == first.json()["images"]

    metrics = httpx.get(ray_url + "/metrics", timeout=10)
    assert metrics.status_code == 200 and "engine_requests" in metrics.text
    models = httpx.get(ray_url + "/v1/models", timeout=10)
    assert models.status_code == 200 and models.json()["data"][0]["adapter_kind"] == "instruct"
