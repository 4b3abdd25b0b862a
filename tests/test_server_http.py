"""HTTP hygiene of the real server (uvicorn on a free 127.0.0.1 port, in a thread of this process): header and body
read timeouts, a short body, JSON nesting, strict content types, malformed multipart, strict integers, names not
paths on /v1/models, the Host and Origin checks without a key, the docs behind a key, 500s that say only
"internal error", and Retry-After from the queue's expected wait."""
import asyncio
import logging
import socket
import threading
import time

import httpx
import pytest

from ipadapter_instruct.engine.server.batcher import Batcher, Job
from ipadapter_instruct.engine.server.config import ServerConfig
from ipadapter_instruct.engine.server.schemas import EditRequest

from conftest import load_pipe
from server_utils import png_base64

STYLE = "use the style of this image"
TIMEOUTS = {"header_timeout_s": 0.5, "body_timeout_s": 1.0}


class ThreadServer:
    """`serve`'s uvicorn set-up on a free loopback port, in a daemon thread (no signal handlers off the main thread)."""

    def __init__(self, config: ServerConfig, pipe):
        from ipadapter_instruct.engine.server.run import bind, uvicorn_server
        sock = bind(config.host, 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn_server(config, pipe, self.url)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.ready():
            assert time.monotonic() < deadline and self.server.state.failed is None, self.server.state.failed
            time.sleep(0.05)

    def ready(self) -> bool:
        try:
            return httpx.get(self.url + "/ready").status_code == 200
        except httpx.TransportError:
            return False

    def raw(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port))
        s.settimeout(10)  # far above the test's timeouts: a server that never closes fails the test, not hangs it
        return s

    def metric(self, name: str) -> float:
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(tiny):
    paths = {k: str(tiny[k]) for k in ("model", "image_encoder", "adapter")}  # for /v1/models: the pipe is given
    srv = ThreadServer(ServerConfig(warmup=False, max_wait_ms=0, **paths, **TIMEOUTS), load_pipe(tiny, tiny["adapter"]))
    yield srv
    srv.close()


def body(image, **kw):
    return {"prompt": "a house", "image": png_base64(image), "instruct": STYLE, "num_inference_steps": 1, **kw}


def error_of(r, status, field=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["code"] and r.json()["request_id"] == r.headers["x-request-id"]
    assert err.get("field") == field, err
    return err


def post(server, **kwargs) -> httpx.Response:
    return httpx.post(server.url + "/v1/generate", timeout=60, **kwargs)  # a cold first call takes seconds here


def read_all(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout if it never does)."""
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


# ---- read timeouts and short bodies -------------------------------------------------------------------------

def test_an_idle_connection_is_closed_after_the_header_timeout(server):
    with server.raw() as s:
        assert read_all(s) == b""


def test_a_partial_header_is_closed_after_the_header_timeout(server):
    with server.raw() as s:
        s.sendall(b"POST /v1/generate HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n")
        assert read_all(s) == b""


def test_a_body_slower_than_the_body_timeout_is_408(server):
    with server.raw() as s:
        s.sendall(b"POST /v1/generate HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                  b"content-length: 100\r\n\r\n{\"prompt\": ")
        answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 408 ") and b'"body_timeout"' in answer, answer


def test_a_keep_alive_connection_serves_its_next_request(server):
    with httpx.Client() as client:   # one connection: the header timer re-arms for the second request
        assert client.get(server.url + "/health").status_code == 200
        time.sleep(0.2)
        assert client.get(server.url + "/health").status_code == 200


def test_a_body_shorter_than_its_content_length_is_a_400_not_a_traceback(server, caplog):
    before = server.metric('engine_requests_total{status="400"}')
    with caplog.at_level(logging.INFO), server.raw() as s:
        s.sendall(b"POST /v1/generate HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                  b"content-length: 100\r\n\r\n{\"prompt\": ")
        s.shutdown(socket.SHUT_WR)   # the client stops sending 90 bytes short
        read_all(s)
        deadline = time.monotonic() + 10
        while server.metric('engine_requests_total{status="400"}') == before and time.monotonic() < deadline:
            time.sleep(0.05)
    assert server.metric('engine_requests_total{status="400"}') == before + 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text


# ---- bodies ---------------------------------------------------------------------------------------------------

def test_deeply_nested_json_is_a_422_naming_the_body_and_counted(server):
    before = server.metric('engine_requests_total{status="422"}')
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = post(server, content=deep, headers={"content-type": "application/json"})
    assert "nested" in error_of(r, 422, "body")["message"]
    r = post(server, json={"scale": {"up": {"a": {"b": {"c": {"d": [[[[[[1]]]]]]}}}}}})
    assert "nested" in error_of(r, 422, "body")["message"]
    assert server.metric('engine_requests_total{status="422"}') == before + 2


@pytest.mark.parametrize("ctype, status", [
    ("application/json-garbage", 415), ("text/plain", 415), ("application/jsonp", 415),
    ("multipart/form-data-x; boundary=x", 415), ("application/x-www-form-urlencoded", 415),
    ("application/json; charset=utf-8", 422), ("Application/JSON", 422),
])
def test_only_json_and_multipart_are_read(server, ctype, status):
    r = post(server, content=b'{"num_inference_steps": 0}', headers={"content-type": ctype})
    error_of(r, status, "num_inference_steps" if status == 422 else "content-type")


@pytest.mark.parametrize("ctype, data", [
    ("multipart/form-data", b"--x\r\n"),                                   # no boundary
    ("multipart/form-data; boundary=xyz", b"--xyz\r\ncontent-disposition: form-data\r\n\r\n1\r\n--xyz--\r\n"),
    ("multipart/form-data; boundary=xyz", b"--xyz\r\ngarbage without a header end"),
])
def test_malformed_multipart_is_a_422_naming_the_body(server, ctype, data):
    r = post(server, content=data, headers={"content-type": ctype})
    assert "multipart" in error_of(r, 422, "body")["message"]


def test_adapter_start_after_adapter_end_names_adapter_start(server, cond_image):
    r = post(server, json=body(cond_image, adapter_start=0.8, adapter_end=0.2))
    assert "adapter_end" in error_of(r, 422, "adapter_start")["message"]


@pytest.mark.parametrize("field", ["num_inference_steps", "num_images_per_prompt", "seed", "height", "width"])
def test_booleans_are_not_integers(server, cond_image, field):
    r = post(server, json=body(cond_image, **{field: True}))
    assert "boolean" in error_of(r, 422, field)["message"]


def test_booleans_are_not_integers_in_edits_nor_size_pairs():
    from pydantic import ValidationError
    for bad in ({"seed": False}, {"num_images": True}):
        with pytest.raises(ValidationError, match="boolean"):
            EditRequest.model_validate({"prompt": "x", **bad})
    from ipadapter_instruct.engine.server.schemas import GenerateRequest
    with pytest.raises(ValidationError, match="boolean"):
        GenerateRequest.model_validate({"original_size": [True, 64]})
    assert GenerateRequest.model_validate({"seed": "7", "num_images": 2.0}).seed == 7  # multipart's strings still


# ---- what is shown and to whom ----------------------------------------------------------------------------------

def test_models_show_names_not_paths(server, tiny):
    card = httpx.get(server.url + "/v1/models").json()["data"][0]
    for key in ("base", "adapter", "image_encoder"):
        assert "/" not in card[key] and card[key], card
    assert card["adapter"] == str(tiny["adapter"]).rsplit("/", 1)[-1]


def test_a_foreign_origin_is_403_without_a_key(server, cond_image):
    for method, path in (("POST", "/v1/generate"), ("GET", "/v1/models"), ("GET", "/metrics")):
        r = httpx.request(method, server.url + path, json=body(cond_image), headers={"origin": "http://evil.example"})
        error_of(r, 403, "origin")
    same = httpx.get(server.url + "/v1/models", headers={"origin": server.url})   # the page's own origin
    assert same.status_code == 200, same.text


@pytest.mark.parametrize("host, status", [
    ("evil.example", 403), ("evil.example:{port}", 403), ("127.0.0.1.evil.example", 403), ("", 403),
    ("127.0.0.1:{port}", 200), ("localhost:{port}", 200), ("LOCALHOST", 200), ("[::1]:{port}", 200),
    ("localhost:9999", 200),   # an ssh tunnel's port: the name is what DNS rebinding changes
])
def test_a_foreign_host_is_403_without_a_key(server, host, status):
    r = httpx.get(server.url + "/v1/models", headers={"host": host.format(port=server.port)})
    assert r.status_code == status, r.text
    if status == 403:
        error_of(r, 403, "host")


def asgi_get(config: ServerConfig, path: str, **headers) -> httpx.Response:
    """GET on an app whose model never loads (no lifespan): the checks before any route are what answer."""
    from ipadapter_instruct.engine.server.app import create_app
    app = create_app(config)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            return await c.get(path, headers=headers)
    return asyncio.run(go())


@pytest.mark.parametrize("config, host, status", [
    (ServerConfig(host="0.0.0.0"), "anything.example", 200),             # all interfaces: any name...
    (ServerConfig(host="0.0.0.0", allowed_hosts="gpu.lan"), "anything.example", 403),   # ...unless listed
    (ServerConfig(host="0.0.0.0", allowed_hosts="gpu.lan, other.lan"), "other.lan:8000", 200),
    (ServerConfig(host="10.1.2.3"), "10.1.2.3:8000", 200),
    (ServerConfig(host="10.1.2.3"), "box.lan", 403),
    (ServerConfig(host="::1"), "[::1]:8000", 200),
    (ServerConfig(allowed_hosts="*"), "anything.example", 200),
])
def test_allowed_hosts(config, host, status):
    assert asgi_get(config, "/health", host=host).status_code == status


def test_origin_and_host_checks_with_a_key_and_with_cors(tmp_path):
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    keyed = ServerConfig(api_key_file=str(key))
    assert asgi_get(keyed, "/health", origin="http://evil.example", host="evil.example").status_code == 200
    assert asgi_get(ServerConfig(cors_origin="http://app.example"), "/health",
                    origin="http://app.example").status_code == 200
    assert asgi_get(ServerConfig(cors_origin="http://app.example"), "/health", origin="null").status_code == 403


def test_docs_and_schema_are_behind_the_key_when_there_is_one(tmp_path):
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    keyed = ServerConfig(api_key_file=str(key))
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert asgi_get(keyed, path).status_code == 401, path
        assert asgi_get(keyed, path, authorization="Bearer s3cret").status_code == 200, path
        assert asgi_get(ServerConfig(), path).status_code == 200, path
    spec = asgi_get(keyed, "/openapi.json", authorization="Bearer s3cret").json()
    assert "/v1/generate" in spec["paths"] and "/docs" not in spec["paths"]


# ---- failures -----------------------------------------------------------------------------------------------

def test_a_500_says_internal_error_with_the_request_id_and_logs_the_detail(server, cond_image, monkeypatch, caplog):
    runner = server.server.state.runner

    def boom(*args, **kwargs):
        raise RuntimeError("secret detail at /home/someone/weights")
    before = server.metric('engine_requests_total{status="500"}')
    with caplog.at_level(logging.INFO):
        monkeypatch.setattr(type(runner), "__call__", boom)          # inside the model
        in_model = post(server, json=body(cond_image), headers={"x-request-id": "r-1"})
        monkeypatch.setattr(type(runner), "prepare", boom)           # in the handler, before the queue
        in_handler = post(server, json=body(cond_image), headers={"x-request-id": "r-2"})
    monkeypatch.undo()
    for r, rid in ((in_model, "r-1"), (in_handler, "r-2")):
        err = error_of(r, 500)
        assert err == {"code": "internal", "message": f"internal error (request id {rid}); the detail is in the "
                                                      "server's log"}, err
    logged = [(r.getMessage(), r.exc_info) for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(logged) == 2, caplog.text   # once each, with the request id and the exception
    for (message, exc_info), rid in zip(logged, ("r-1", "r-2")):
        assert rid in message and "secret detail" in str(exc_info[1])
    assert server.metric('engine_requests_total{status="500"}') == before + 2
    assert post(server, json=body(cond_image)).status_code == 200


# ---- Retry-After ------------------------------------------------------------------------------------------------

def test_retry_after_is_the_queues_expected_wait():
    # a call at step 1 of 100 after 0.3 s has about 30 s left; two more calls wait behind it
    gate = threading.Event()

    def run(jobs, progress):
        time.sleep(0.3)
        progress(1, 100)
        gate.wait(10)
        return [None for _ in jobs]

    async def main():
        b = Batcher(run, max_batch_rows=2, max_wait_ms=0, max_queue=2)
        b.start()
        first = b.submit(Job("a", "k", 2, time.monotonic() + 60))
        await asyncio.sleep(0.1)
        idle = b.retry_after_s()                     # running, no progress yet: no estimate beyond the floor
        b.submit(Job("b", "k", 2, time.monotonic() + 60))
        b.submit(Job("c", "k", 2, time.monotonic() + 60))
        await asyncio.sleep(0.5)
        busy = b.retry_after_s()
        gate.set()
        await first
        await b.stop()
        return idle, busy

    idle, busy = asyncio.run(main())
    assert idle >= 1 and busy >= 30, (idle, busy)   # the running call's rest, then the two queued calls like it
