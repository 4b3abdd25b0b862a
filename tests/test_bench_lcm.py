"""`python -m bench --providers engine,engine-lcm`: the few-step provider (the LCM scheduler at --few-steps) runs
in the same table as the 30-step ones, its rows say its own steps and scheduler, and torch's FLOP count (made of
--steps' work) is not applied to it; `--scheduler` sets every provider's."""
import json

from ipadapter_instruct.bench.__main__ import main


def rows_of(path):
    return json.loads(path.read_text())


def test_engine_lcm_rows_carry_their_own_steps(tmp_path, capsys):
    path = tmp_path / "e2e.json"
    assert main(["--device", "cpu", "--providers", "engine-eager,engine-lcm", "--batch", "1", "--steps", "3",
                 "--few-steps", "2", "--repeats", "1", "--cache", str(tmp_path / "w"), "--json", str(path)]) == 0
    rows = rows_of(path)
    lcm = [r for r in rows if r["provider"] == "engine-lcm"]
    eager = [r for r in rows if r["provider"] == "engine-eager"]
    assert lcm and eager
    assert {(r["config"]["steps"], r["config"]["scheduler"]) for r in lcm} == {(2, "lcm")}
    assert {(r["config"]["steps"], r["config"]["scheduler"]) for r in eager} == {(3, "default")}
    assert any(r["unit"] == "TFLOP/s" for r in eager) and not any(r["unit"] == "TFLOP/s" for r in lcm)
    assert all(r["p50"] > 0 for r in lcm if r["metric"] == "latency")


def test_scheduler_flag_reaches_every_provider(tmp_path):
    path = tmp_path / "e2e.json"
    assert main(["--device", "cpu", "--providers", "engine,diffusers", "--scheduler", "tcd", "--batch", "1",
                 "--steps", "2", "--repeats", "1", "--cache", str(tmp_path / "w"), "--json", str(path)]) == 0
    assert {r["config"]["scheduler"] for r in rows_of(path)} == {"tcd"}


def test_both_sides_swap_to_the_scheduler(tmp_path):
    import torch

    from ipadapter_instruct.bench.e2e_config import E2EConfig
    from ipadapter_instruct.bench.e2e_providers import DiffusersProvider, EngineProvider
    from ipadapter_instruct.bench.weights import bench_weights

    paths = bench_weights("tiny", str(tmp_path / "w"))
    cfg = E2EConfig(scheduler="tcd", steps=2)
    d = DiffusersProvider(paths, torch.device("cpu"), torch.float32, cfg)
    assert type(d.pipe.scheduler).__name__ == "TCDScheduler"
    e = EngineProvider("engine", paths, torch.device("cpu"), torch.float32, cfg)
    assert e.scheduler == "tcd" and EngineProvider("engine-lcm", paths, torch.device("cpu"), torch.float32,
                                                   cfg).scheduler == "lcm"
