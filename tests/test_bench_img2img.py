"""`python -m bench --task img2img|inpaint` on the CPU: the engine beside diffusers' StableDiffusionImg2ImgPipeline /
StableDiffusionInpaintPipeline on the tiny weights (inpaint: a 9-channel inpainting model), rows in the agreed format;
the two sides do equal work (the same images for the same seeds in the bench's own call)."""
import json

import numpy as np
import pytest
import torch

from ipadapter_instruct.bench.__main__ import main

PROVIDERS = ("engine", "engine-eager", "diffusers")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bench-img2img-weights"))


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_tasks_write_rows_for_the_three_providers(cache, tmp_path, capsys, task):
    path = tmp_path / f"{task}.json"
    assert main(["--task", task, "--device", "cpu", "--batch", "1,2", "--steps", "4", "--strength", "0.75",
                 "--repeats", "1", "--cache", cache, "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert {r["config"]["task"] for r in rows} == {task} and {r["config"]["strength"] for r in rows} == {0.75}
    latency = {(r["provider"], r["x"]): r for r in rows if r["metric"] == "latency"}
    assert set(latency) == {(p, b) for p in PROVIDERS for b in (1, 2)}
    for provider in PROVIDERS:  # both sides time the photo's VAE encoding, the UNet per step and the decode
        stages = {r["metric"]: r["p50"] for r in rows if r["provider"] == provider and r["x"] == 2}
        for stage in ("stage:image_latent", "stage:unet_ms_per_step", "stage:vae_decode"):
            assert stages[stage] > 0, (provider, stage)
    assert "vs diffusers" in capsys.readouterr().out


@pytest.mark.parametrize("task,strength", [("img2img", 0.6), ("inpaint", None), ("inpaint", 0.7)])
def test_engine_and_diffusers_answer_the_same(cache, task, strength):
    """The bench's own call on both sides gives the same PNGs (within a grey level) for the same seeds, the engine
    holding diffusers' IP-Adapter+ file here (the bench's engine reads the Instruct one: equal work, other images)."""
    from ipadapter_instruct.bench.e2e_config import E2EConfig
    from ipadapter_instruct.bench.e2e_providers import DiffusersProvider, EngineProvider
    from ipadapter_instruct.bench.weights import bench_weights
    from ipadapter_instruct.engine.demo import draw_condition_image

    paths = bench_weights("tiny", cache, task=task)
    cfg = E2EConfig(task=task, strength=strength, steps=4)
    cpu = torch.device("cpu")
    image = draw_condition_image(64)
    want = DiffusersProvider(paths, cpu, torch.float32, cfg)(image, 2)
    plus = {**paths, "adapter": paths["plus_adapter"]}
    got = EngineProvider("engine", plus, cpu, torch.float32, cfg)(image, 2)
    assert got.images[0].size == want[0].size == (64, 64)
    for g, w in zip(got, want):
        assert np.abs(np.asarray(g, int) - np.asarray(w, int)).max() <= 1
    assert np.abs(np.asarray(got[0], int) - np.asarray(got[1], int)).max() > 1  # seeds 0 and 1 differ
    if task == "inpaint":
        assert EngineProvider("engine", paths, cpu, torch.float32, cfg).pipe.unet.config.in_channels == 9


@pytest.mark.parametrize("argv,says", [
    (["--strength", "0.5"], "--strength is the img2img / inpaint tasks'"),
    (["--task", "img2img", "--strength", "1.5"], "--strength must be in (0, 1]"),
    (["--task", "inpaint", "--preset", "tiny-sdxl"], "runs on the SD1.5 presets"),
])
def test_bad_flags_are_one_line(argv, says, capsys):
    assert main([*argv, "--device", "cpu"]) != 0
    assert says in capsys.readouterr().err
