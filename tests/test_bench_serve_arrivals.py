"""`python -m bench serve --arrival poisson`: the arrival generator, the request mix, the flags it refuses, and one
open-loop run of the request-level and step-level servers on the CPU (tiny preset)."""
import json
import statistics

import pytest

from ipadapter_instruct.bench.__main__ import main
from ipadapter_instruct.bench.serve_config import MIXES, ServeConfig, request_body
from ipadapter_instruct.bench.serve_open import arrival_times


@pytest.mark.parametrize("rate", [0.7, 3.0, 13.0])
def test_arrival_times_are_a_seeded_poisson_process(rate):
    times = arrival_times(rate, 20_000, seed=5)
    assert times == arrival_times(rate, 20_000, seed=5)  # the same seed: the same times for every server
    assert times[:50] != arrival_times(rate, 50, seed=6)
    gaps = [b - a for a, b in zip([0.0, *times], times)]
    assert min(gaps) > 0
    # exponential gaps: mean 1/rate (standard error 1/rate/sqrt(n) = 0.7 %), standard deviation equal to the mean
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.03)
    assert statistics.pstdev(gaps) == pytest.approx(1 / rate, rel=0.05)
    # a Poisson count: the arrivals in each unit of time have variance equal to their mean
    counts = [0] * int(times[-1])
    for t in times:
        if t < len(counts):
            counts[int(t)] += 1
    assert statistics.pvariance(counts) == pytest.approx(statistics.fmean(counts), rel=0.15)


def test_arrival_times_refuse_a_rate_that_is_not_positive():
    with pytest.raises(ValueError, match="positive rate"):
        arrival_times(0.0, 3, seed=0)
    assert arrival_times(2.0, 0, seed=0) == []


def test_the_mixed_requests_cycle_by_index_and_the_same_ones_do_not():
    mixed, same = ServeConfig(steps=10, mix="mixed"), ServeConfig(steps=10)
    shapes = [(b["num_inference_steps"], b["guidance_mode"]) for b in (request_body(i, mixed, "x") for i in range(8))]
    assert shapes == [(10, "simple"), (10, "full"), (5, "simple"), (20, "simple")] * 2
    assert len(MIXES["mixed"]) == 4
    bodies = [request_body(i, same, "x") for i in range(3)]
    assert [b["seed"] for b in bodies] == [0, 1, 2]  # independent requests: a seed each
    assert {(b["num_inference_steps"], b["guidance_mode"]) for b in bodies} == {(10, "simple")}


@pytest.mark.parametrize("argv, message", [
    (["--arrival", "poisson", "--servers", "engine-step"], "--rates auto measures"),
    (["--arrival", "poisson", "--duration-s", "5"], "--duration-s is a closed-loop soak"),
    (["--mix", "mixed"], "leave diffusers out"),
    (["--arrival", "poisson", "--rates", "2,2"], "--rates lists a value twice"),
])
def test_serve_refuses_arrival_flags_that_cannot_run(argv, message, capsys):
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.parametrize("rates", ["0", "-1,2", "2,fast", "inf"])
def test_serve_rates_must_be_positive_numbers(rates, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--arrival", "poisson", f"--rates={rates}"])
    assert e.value.code == 2 and "expected comma-separated positive numbers" in capsys.readouterr().err


def test_poisson_arrivals_on_request_and_step_batching(tmp_path, capsys):
    path, png = tmp_path / "serve.json", tmp_path / "serve.png"
    # --rates auto at light loads (the engine's closed-loop capacity first), mixed steps and guidance modes
    assert main(["serve", "--preset", "tiny", "--servers", "engine-step,engine", "--arrival", "poisson",
                 "--rates", "auto", "--loads", "0.25,0.5", "--requests", "8", "--steps", "4", "--mix", "mixed",
                 "--json", str(path), "--plot", str(png)]) == 0
    rows = json.loads(path.read_text())
    by = {(r["provider"], r["metric"], r["x"]): r for r in rows}
    capacity = [r for r in rows if r["metric"] == "capacity"]
    assert len(capacity) == 1 and capacity[0]["provider"] == "engine" and capacity[0]["p50"] > 0
    # the capacity level sends its own count (workers x rounds), all answered: none lost
    assert capacity[0]["config"]["sent"] == capacity[0]["config"]["ok"] and capacity[0]["config"]["lost"] == 0
    rates = capacity[0]["config"]["rates"]
    assert rates == pytest.approx([0.25 * capacity[0]["p50"], 0.5 * capacity[0]["p50"]], rel=0.01)
    for server in ("engine", "engine-step"):
        for rate, load in zip(rates, (0.25, 0.5)):
            key = (server, "throughput", rate)
            assert by[key]["x_name"] == "rate" and by[key]["config"]["load"] == load
            assert by[(server, "responses:200", rate)]["p50"] == 8 and by[(server, "lost", rate)]["p50"] == 0
            # at half the capacity or less the server keeps up with the arrivals; the lower bound is loose, so that a
            # busy machine (another job on these cores) does not fail it, while a stalled server still does
            assert 0.1 * by[key]["config"]["arrived_rate"] < by[key]["p50"] < 1.5 * by[key]["config"]["arrived_rate"]
            lat = by[(server, "latency", rate)]
            assert 0 < lat["p20"] <= lat["p50"] <= lat["p80"] <= lat["config"]["p90"] <= lat["config"]["p99"]
            assert by[(server, "queue_wait", rate)]["config"]["mean"] >= 0
            rows_per = by[(server, "batch_rows", rate)]
            assert rows_per["config"]["per"] == ("step" if server == "engine-step" else "call")
            assert rows_per["p50"] >= 2 and rows_per["config"]["max"] <= 16
    for rate in rates:
        step, request = by[("engine-step", "latency", rate)], by[("engine", "latency", rate)]
        p99 = by[("engine-step", "p99_ratio:engine", rate)]
        assert p99["unit"] == "x" and p99["p50"] == pytest.approx(step["config"]["p99"] / request["config"]["p99"])
        assert by[("engine-step", "p50_ratio:engine", rate)]["p50"] > 0
        assert by[("engine-step", "throughput_ratio:engine", rate)]["p50"] == pytest.approx(
            by[("engine-step", "throughput", rate)]["p50"] / by[("engine", "throughput", rate)]["p50"])
    out = capsys.readouterr().out
    assert "engine-step / engine at the same arrivals" in out and "capacity of engine" in out
    assert "exited with code" not in out
    assert png.stat().st_size > 10_000


def test_cuda_graphs_flag_reaches_the_engine_servers_or_is_refused(capsys):
    import torch

    from ipadapter_instruct.bench.serve_config import ServeConfig
    from ipadapter_instruct.bench.serve_servers import server_argv
    paths = dict(model="m", image_encoder="e", adapter="a", plus_adapter="p")
    cfg = ServeConfig(cuda_graphs=True)
    for name in ("engine", "engine-step", "engine-single"):
        assert "--cuda-graphs" in server_argv(name, paths, cfg)
    assert "--cuda-graphs" not in server_argv("engine", paths, ServeConfig())
    if not torch.cuda.is_available():
        assert main(["serve", "--servers", "engine", "--cuda-graphs"]) == 2
        assert "--cuda-graphs needs a CUDA GPU" in capsys.readouterr().err
