"""`python -m bench serve` on the CPU: four real servers under load, rows in the agreed format."""
import json

import pytest

from ipadapter_instruct.bench.__main__ import main

KEYS = {"op", "provider", "metric", "unit", "x_name", "x", "p20", "p50", "p80", "device", "dtype", "git_sha", "config"}


def test_serve_runs_four_servers_at_two_levels(tmp_path, capsys):
    path = tmp_path / "serve.json"
    # --max-wait-ms 100 (default 10): the first two requests must meet in the batcher even on a busy machine;
    # once they share a call they come back together and stay in step
    assert main(["serve", "--preset", "tiny", "--concurrency", "1,2", "--requests", "4", "--steps", "2",
                 "--max-wait-ms", "100", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert rows and all(set(r) == KEYS for r in rows) and {r["op"] for r in rows} == {"serve"}
    by = {(r["provider"], r["metric"], r["x"]): r for r in rows}
    for server in ("engine", "engine-step", "engine-single", "diffusers"):
        assert by[(server, "ready", "start")]["p50"] > 0
        for c in (1, 2):
            assert by[(server, "responses:200", c)]["p50"] == 4, (server, c)  # every request ended in 200 ...
            for status in ("429", "503", "504", "other", "transport"):  # ... at the first try
                assert by[(server, f"responses:{status}", c)]["p50"] == 0, (server, c, status)
            assert by[(server, "lost", c)]["p50"] == 0
            assert by[(server, "throughput", c)]["unit"] == "images/s" and by[(server, "throughput", c)]["p50"] > 0
            lat = by[(server, "latency", c)]
            assert lat["unit"] == "ms" and 0 < lat["p20"] <= lat["p50"] <= lat["p80"] <= lat["config"]["p99"]
            assert by[(server, "rss", c)]["p50"] > 0
    # the batcher shares calls at concurrency 2; the single-request server and diffusers never do
    assert by[("engine", "batch_rows", 2)]["config"]["max"] > 2
    assert by[("engine-single", "batch_rows", 2)]["config"]["max"] == 2
    assert ("diffusers", "batch_rows", 2) not in by
    assert by[("engine", "batch_rows", 2)]["config"]["per"] == "call"
    assert by[("engine-step", "batch_rows", 2)]["config"]["per"] == "step"  # rows per UNet step
    assert by[("engine", "throughput_ratio:diffusers", 2)]["unit"] == "x"
    assert by[("engine-step", "throughput_ratio:engine", 2)]["p50"] > 0
    out = capsys.readouterr().out
    assert "engine / engine-single" in out and "engine-step / engine" in out and "start to ready" in out
    assert "exited with code" not in out


@pytest.mark.parametrize("url", ["http://example.com:8000", "http://10.0.0.1:8000", "http://[::2]:8000",
                                 "ftp://127.0.0.1:8000"])
def test_serve_refuses_a_url_off_this_machine(url, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--url", url])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an http URL on this machine" in err


def test_hostile_mix_leaves_the_good_images_as_they_are(tiny):
    """`--hostile`: the good requests' images against each alone, hostile ones among them, on an in-process server
    whose batcher waits long enough for them to share calls; out-of-range values are all refused."""
    from ipadapter_instruct.bench.serve_config import ServeConfig, condition_image_b64, request_body
    from ipadapter_instruct.bench.serve_hostile import HOSTILE, broken, hostile_line, hostile_run
    from conftest import load_pipe
    from ipadapter_instruct.engine.server.config import ServerConfig
    from server_utils import InProcessServer

    server = InProcessServer(ServerConfig(max_wait_ms=500), load_pipe(tiny, tiny["adapter"]))
    try:
        cfg = ServeConfig(steps=2)
        goods = [request_body(i, cfg, condition_image_b64("tiny")) for i in range(3)]
        res = server.call(hostile_run(server.client, goods, 0.75, 4, 120.0))
    finally:
        server.close()
    assert res["hostile"] == 9 == len(HOSTILE) and res["refused"] == 5, res  # each hostile kind once
    assert not broken(res) and res["changed"] == 0 and res["max_diff"] <= 1, res
    assert res["batch_requests"] > 1 and res["in_range_200"] + res["in_range_422"] == 4, res
    assert "isolation held" in hostile_line("engine", res)


@pytest.mark.parametrize("share", ["0", "1", "1.5", "nan"])
def test_hostile_share_must_be_between_0_and_1(share, capsys):
    assert main(["serve", "--hostile", share, "--servers", "engine"]) == 2
    assert "--hostile is a share of the requests" in capsys.readouterr().err
