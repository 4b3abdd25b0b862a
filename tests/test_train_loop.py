"""The trainer on tiny weights and a synthetic set (CPU): it learns, it saves what the engine loads, it resumes
bit-identically, two processes equal one with the same global batch, and bad input gets a clear error."""
import csv
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import PROMPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES = 32  # tiny VAE factor 4: 8x8 latents


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from train.data import make_synthetic
    return make_synthetic(str(tmp_path_factory.mktemp("synthetic")), 12, seed=0, size=48)


def run(tiny, data, out, *extra, init=None):
    from train.__main__ import main
    args = ["--model", tiny["model"], "--image-encoder", tiny["image_encoder"], "--data", data, "--out", str(out),
            "--resolution", str(RES), "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "1",
            "--val-fraction", "0.2", "--no-progress", "--device", "cpu", *extra]  # a later --lr overrides
    # (--device cpu: these comparisons are bitwise and the CPU is deterministic; on a GPU the default would be
    # cuda, with the Triton backward's atomics)
    if init:
        args += ["--init-adapter", init]
    assert main(args) == 0
    return os.path.join(out, "adapter.safetensors")


def losses(out):
    with open(os.path.join(out, "log.csv")) as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r["loss"]]


def val_losses(out):
    with open(os.path.join(out, "log.csv")) as f:
        return [float(r["val_loss"]) for r in csv.DictReader(f) if r["val_loss"]]


def test_loss_goes_down_and_the_engine_loads_the_result(tiny, synthetic, tmp_path, cond_image):
    out = tmp_path / "run"
    path = run(tiny, synthetic, out, "--steps", "30", "--save-every", "10", "--lr", "1e-2", init=tiny["adapter"])
    seen = losses(out)
    assert len(seen) == 30 and sum(seen[-5:]) < sum(seen[:5]), seen
    # the validation loss (fixed noise and timesteps per example) at step 0 and at each checkpoint
    val = val_losses(out)
    assert len(val) == 4 and all(b < a for a, b in zip(val, val[1:])) and val[-1] < 0.95 * val[0], val
    try:
        import tensorboard  # noqa: F401  (in the dev extra; optional for users)
        assert os.listdir(out / "tensorboard"), "TensorBoard events"
    except ImportError:
        assert not (out / "tensorboard").exists()
    assert sorted(os.listdir(out / "checkpoints")) == [f"step-{s:08d}.pt" for s in (10, 20, 30)]

    from engine import Pipeline
    call = dict(prompt=PROMPT, image=cond_image, instruct="use the composition", num_inference_steps=2, seed=0,
                output_type="latent")
    before = Pipeline.from_pretrained(tiny["model"], image_encoder=tiny["image_encoder"], adapter=tiny["adapter"])
    after = Pipeline.from_pretrained(tiny["model"], image_encoder=tiny["image_encoder"], adapter=path)
    for p in (before, after):
        p.set_progress_bar_config(disable=True)
    assert (after(**call) - before(**call)).abs().max() > 1e-3


def test_resume_continues_bit_identically(tiny, synthetic, tmp_path):
    straight = run(tiny, synthetic, tmp_path / "a", "--steps", "6", "--save-every", "3", "--grad-accum", "2")
    run(tiny, synthetic, tmp_path / "b", "--steps", "3", "--save-every", "3", "--grad-accum", "2")
    resumed = run(tiny, synthetic, tmp_path / "b", "--steps", "6", "--save-every", "3", "--grad-accum", "2",
                  "--resume")
    a, b = load_file(straight), load_file(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and val_losses(tmp_path / "a") == val_losses(tmp_path / "b")


def test_plus_initialisation_starts_as_ip_adapter_plus(tiny, plus_dir):
    """From an IP-Adapter+ file the new paths add nothing at first: any instruction gives the plus tokens."""
    from diffusers import UNet2DConditionModel

    from engine.adapter import load_adapter
    from train.model import init_adapter
    unet = UNet2DConditionModel.from_pretrained(tiny["model"], subfolder="unet")
    plus = load_adapter(plus_dir / "plus.safetensors", unet)
    cfg = plus.projector.config
    adapter = init_adapter(unet, cfg.image_dim, 32, str(plus_dir / "plus.safetensors"))
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 5, cfg.image_dim, generator=g)
    instruct, prompt = torch.randn(2, 77, 32, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(adapter.projector(image, instruct, prompt), plus.projector(image))
    assert adapter.projector.config.is_instruct
    assert any(p.abs().sum() > 0 for p in adapter.projector.prompt_layers.parameters())  # noise, not zeros


def test_two_processes_agree_with_one(tiny, synthetic, tmp_path):
    one = run(tiny, synthetic, tmp_path / "one", "--steps", "3", "--save-every", "3", "--batch-size", "4",
              init=tiny["adapter"])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "train", "--model", tiny["model"], "--image-encoder", tiny["image_encoder"], "--data", synthetic,
           "--out", str(tmp_path / "two"), "--resolution", str(RES), "--batch-size", "2", "--lr", "1e-3",
           "--warmup-steps", "1", "--val-fraction", "0.2", "--no-progress", "--steps", "3", "--save-every", "3",
           "--init-adapter", tiny["adapter"], "--device", "cpu"]  # gloo on the CPU: one GPU cannot host two ranks
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = load_file(one), load_file(str(tmp_path / "two" / "adapter.safetensors"))
    # the same examples, noise and timesteps: the logged losses agree; the weights agree up to Adam's sign
    # sensitivity on near-zero gradients (seen: 2e-5 on 0.05 % of one tensor's elements, steps of lr = 1e-3)
    assert losses(tmp_path / "one") == losses(tmp_path / "two")
    assert val_losses(tmp_path / "one") == val_losses(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=0, msg=k)
    init = load_file(tiny["adapter"])
    assert any(not torch.equal(a[k], init[k]) for k in a)  # three steps did move the weights


def test_bad_manifest_line_is_a_clear_error(tiny, tmp_path, capsys):
    from train.__main__ import main
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"condition": "a.png", "target": "a.png", "caption": "x", "task": "style"}\n{not json\n')
    code = main(["--model", tiny["model"], "--image-encoder", tiny["image_encoder"], "--data", str(bad),
                 "--out", str(tmp_path / "o"), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "bad.jsonl:1:" in err and err.count("\n") == 1


def test_ema_checkpointing_and_bf16(tiny, synthetic, tmp_path):
    init = load_file(tiny["adapter"])
    one = dict(init=tiny["adapter"])
    plain = load_file(run(tiny, synthetic, tmp_path / "plain", "--steps", "1", **one))
    # EMA after one step: 0.9 * initial + 0.1 * trained, and that average is what gets saved
    ema = load_file(run(tiny, synthetic, tmp_path / "ema", "--steps", "1", "--ema-decay", "0.9", **one))
    for k in init:
        torch.testing.assert_close(ema[k], 0.9 * init[k] + 0.1 * plain[k], atol=1e-7, rtol=1e-5, msg=k)
    # gradient checkpointing recomputes the same activations: the same step
    ckpt = load_file(run(tiny, synthetic, tmp_path / "ckpt", "--steps", "1", "--gradient-checkpointing", **one))
    for k in init:
        torch.testing.assert_close(ckpt[k], plain[k], atol=1e-6, rtol=0, msg=k)
    # bf16 autocast runs and stays finite
    bf16 = load_file(run(tiny, synthetic, tmp_path / "bf16", "--steps", "2", "--mixed-precision", "bf16", **one))
    assert all(torch.isfinite(v).all() for v in bf16.values())
    assert all(float(x) > 0 for x in losses(tmp_path / "bf16"))
