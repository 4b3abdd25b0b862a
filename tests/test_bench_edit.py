"""`python -m bench --task edit` on the CPU: InstructPix2Pix, engine vs diffusers on the tiny IP2P weights, rows in
the agreed format; the two sides do equal work (the same images for the same seeds in the bench's own call)."""
import json

import numpy as np
import pytest
import torch

from ipadapter_instruct.bench.__main__ import main

KEYS = {"op", "provider", "metric", "unit", "x_name", "x", "p20", "p50", "p80", "device", "dtype", "git_sha", "config"}
PROVIDERS = ("engine", "engine-eager", "diffusers")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bench-edit-weights"))


def test_edit_task_writes_rows_for_the_three_providers(cache, tmp_path, capsys):
    path = tmp_path / "edit.json"
    assert main(["--task", "edit", "--device", "cpu", "--batch", "1,2", "--steps", "2", "--repeats", "1",
                 "--cache", cache, "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert rows and all(set(r) == KEYS for r in rows)
    assert {r["config"]["task"] for r in rows} == {"edit"}
    assert {r["config"]["image_guidance_scale"] for r in rows} == {1.5}
    latency = {(r["provider"], r["x"]): r for r in rows if r["metric"] == "latency"}
    assert set(latency) == {(p, b) for p in PROVIDERS for b in (1, 2)}
    for r in latency.values():
        assert r["unit"] == "ms" and 0 < r["p20"] <= r["p50"] <= r["p80"]
    for provider in PROVIDERS:  # both sides time the photo's VAE encoding, the UNet per step and the decode
        stages = {r["metric"]: r["p50"] for r in rows if r["provider"] == provider and r["x"] == 2}
        for stage in ("stage:text_encoder", "stage:image_latent", "stage:unet_ms_per_step", "stage:vae_decode"):
            assert stages[stage] > 0, (provider, stage)
    flops = [r for r in rows if r["unit"] == "TFLOP/s"]  # counted once per batch size, on engine-eager
    assert len(flops) == 6 and all(r["p50"] > 0 for r in flops)
    out = capsys.readouterr().out
    assert "task: edit" in out and "3 UNet rows per image" in out and "vs diffusers" in out


def test_engine_and_diffusers_edit_the_same(cache):
    """The bench's own call on both sides gives the same PNGs (within a grey level) for the same seeds: equal work."""
    from ipadapter_instruct.bench.e2e_config import E2EConfig
    from ipadapter_instruct.bench.e2e_providers import DiffusersProvider, EngineProvider
    from ipadapter_instruct.bench.weights import bench_weights, native_size
    from ipadapter_instruct.engine.demo import draw_condition_image

    paths = bench_weights("tiny", cache, task="edit")
    assert native_size(paths["model"]) == 64
    cfg = E2EConfig(task="edit", guidance_mode="ip2p", guidance_scale=7.5, steps=2)
    photo = draw_condition_image(64)
    cpu = torch.device("cpu")
    want = DiffusersProvider(paths, cpu, torch.float32, cfg)(photo, 2)
    for name in ("engine", "engine-eager"):
        got = EngineProvider(name, paths, cpu, torch.float32, cfg)(photo, 2)
        assert [im.size for im in got] == [im.size for im in want] == [(64, 64)] * 2
        for g, w in zip(got, want):
            assert np.abs(np.asarray(g, int) - np.asarray(w, int)).max() <= 1, name
    assert np.abs(np.asarray(want[0], int) - np.asarray(want[1], int)).max() > 1  # seeds 0 and 1 differ


def test_unknown_task_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--task", "paint"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert "argument --task: invalid choice: 'paint'" in err and "'generate', 'edit'" in err


@pytest.mark.parametrize("argv, message", [
    (["e2e", "--task", "edit", "--guidance-mode", "full"], "--guidance-mode is the generate task's"),
    (["--task", "edit", "--model", "m", "--adapter", "a"], "--task edit takes --model alone"),
    (["--task", "edit", "--providers", "engine,tensorrt"], "the tensorrt provider runs the generate task only"),
])
def test_edit_task_rejects_what_it_cannot_run(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_sd15_edit_preset_is_the_sd15_unet_with_eight_input_channels():
    """The sd15 edit preset's UNet is SD1.5's plus conv_in's 4 extra input channels (320 x 4 x 3 x 3), as in
    timbrooks/instruct-pix2pix; the VAE and text encoder are the generate preset's. Built on the meta device."""
    from ipadapter_instruct.bench.weights import sd15_modules

    with torch.device("meta"):
        unet, vae, text, vision = sd15_modules(edit=True)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(unet) == 859_520_964 + 320 * 4 * 3 * 3 == 859_532_484
    assert (count(vae), count(text), vision) == (83_653_863, 123_060_480, None)
    assert unet.config.in_channels == 8 and unet.config.out_channels == 4
