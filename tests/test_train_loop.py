"""The trainer on tiny weights and a synthetic set (CPU): it learns, it saves what the engine loads, it resumes
bit-identically, bad input gets a clear error, and a bf16 step agrees with the fp32 one (several processes:
test_train_accelerate.py). On a GPU (marked gpu): the fused Triton backward's step against the reference
backend's, and fp16 (GradScaler) and bf16 steps against fp32."""
import csv
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import PROMPT, gpu

RES = 32  # tiny VAE factor 4: 8x8 latents


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from ipadapter_instruct.train.data import make_synthetic
    return make_synthetic(str(tmp_path_factory.mktemp("synthetic")), 12, seed=0, size=48)


def run(tiny, data, out, *extra, init=None):
    from ipadapter_instruct.train.__main__ import main
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

    from ipadapter_instruct.engine import Pipeline
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

    from ipadapter_instruct.engine.adapter import load_adapter
    from ipadapter_instruct.train.model import init_adapter
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


def test_bad_manifest_line_is_a_clear_error(tiny, tmp_path, capsys):
    from ipadapter_instruct.train.__main__ import main
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


# ---- one optimizer step in reduced precision and on the fused kernels, against the fp32 step ------------------

def trainer(tiny, data, out, device="cpu", mixed_precision="no", backend=None):
    """A Trainer from the tiny instruct adapter (batch 4, lr 1e-3, constant LR), its attention on `backend`
    (None: what the loop itself chooses, `auto`)."""
    from ipadapter_instruct.engine.attention import choose_impls
    from ipadapter_instruct.train.loop import TrainConfig, Trainer
    cfg = TrainConfig(model=tiny["model"], image_encoder=tiny["image_encoder"], data=data, out=str(out),
                      init_adapter=tiny["adapter"], batch_size=4, lr=1e-3, resolution=RES, warmup_steps=1,
                      val_fraction=0.2, device=device, mixed_precision=mixed_precision, progress=False)
    tr = Trainer(cfg)
    if backend is not None:
        choose_impls(tr.unet, tr.cross, tr.device, torch.float32, backend)
    return tr


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().float().flatten().cpu() for t in tensors])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def record(tr, steps=1, at=None) -> dict:
    """Run `steps` optimizer steps (from data position `at` if given): the losses, the gradients each step used
    (unscaled and clipped, as the optimizer saw them) and the total change of the trained weights."""
    if at is not None:
        tr.step, tr.epoch, tr.pos = at
    start = flat(tr.params)
    losses, grads = [], []
    for _ in range(steps):
        losses.append(tr.train_step())
        grads.append(flat(p.grad for p in tr.params))
    return dict(losses=losses, grads=grads, update=flat(tr.params) - start)


def accepted_step(tr, tries=24) -> tuple[tuple, dict]:
    """fp16 loss scaling may skip the first steps (an inf in the scaled gradients halves the scale and leaves the
    weights alone): step until one is taken. -> (the data position that step started from, its record)."""
    for _ in range(tries):
        at, scale = (tr.step, tr.epoch, tr.pos), tr.scaler.get_scale()
        rec = record(tr)
        if tr.scaler.get_scale() >= scale:
            return at, rec
        assert torch.equal(rec["update"], torch.zeros_like(rec["update"])), "a skipped step changed the weights"
    raise AssertionError(f"GradScaler skipped {tries} steps in a row")


def test_bf16_autocast_step_agrees_with_fp32(tiny, synthetic, tmp_path):
    """Two steps from the same weights and data, bf16 autocast against fp32. Measured (tiny weights, this data):
    loss 2.6e-4 and 4.8e-4 apart (relative), gradients 1.7e-2 and 1.9e-2 (relative L2: bf16 keeps 8 bits), the
    weight change 0.11 (Adam's first steps are nearly lr * sign(gradient), so the near-zero gradients whose sign
    flips dominate it). The bounds are about 3x those. Autocast that did not run gives the fp32 step exactly, and
    one that lost the adapter's path (its gradients) or broke the backward gives errors of order 1: both fail."""
    exact = record(trainer(tiny, synthetic, tmp_path / "fp32"), steps=2)
    low = record(trainer(tiny, synthetic, tmp_path / "bf16", mixed_precision="bf16"), steps=2)
    for step, (lo, ex, glo, gex) in enumerate(zip(low["losses"], exact["losses"], low["grads"], exact["grads"])):
        assert abs(lo - ex) <= 2e-3 * ex, (step, lo, ex)
        assert 1e-3 < rel(glo, gex) < 5e-2, (step, rel(glo, gex))  # lower bound: bf16 really ran
    assert rel(low["update"], exact["update"]) < 0.3, rel(low["update"], exact["update"])


@gpu
def test_fused_backward_training_step_on_gpu(tiny, synthetic, tmp_path, monkeypatch):
    """On CUDA the loop's `auto` choice is the Triton kernel, whose backward computes the adapter's gradients:
    one fp32 step equals the reference backend's step (exact fp32 dots in both; the kernel's dk/dv atomics only
    reorder fp32 sums, measured 8e-7 relative on the CPU)."""
    from ipadapter_instruct.kernels.backends import implementation
    from pipelines import exact_fp32
    exact_fp32(monkeypatch)
    fused = trainer(tiny, synthetic, tmp_path / "fused", device="cuda")
    assert all(p.impl is implementation("triton") for p in fused.cross.values())
    ref = record(trainer(tiny, synthetic, tmp_path / "ref", device="cuda", backend="reference"))
    got = record(fused)
    assert abs(got["losses"][0] - ref["losses"][0]) <= 1e-5 * ref["losses"][0]
    assert rel(got["grads"][0], ref["grads"][0]) < 1e-4 and rel(got["update"], ref["update"]) < 1e-3


@gpu
@pytest.mark.parametrize("mixed_precision", ["fp16", "bf16"])
def test_mixed_precision_training_step_on_gpu(tiny, synthetic, tmp_path, monkeypatch, mixed_precision):
    """fp16 (GradScaler on) and bf16 autocast on the fused kernels against the fp32 reference step at the same
    data, by the kernels' rule: the fused step's gradient error at most twice the reference backend's in the
    same precision, plus 1e-3; the loss within 2e-3 and the weight change within the bf16 test's 0.3."""
    from pipelines import exact_fp32
    exact_fp32(monkeypatch)
    fused = trainer(tiny, synthetic, tmp_path / "fused", "cuda", mixed_precision)
    before = fused.scaler.state_dict()
    assert fused.scaler.is_enabled() == (mixed_precision == "fp16")
    at, got = accepted_step(fused)
    at_plain, plain = accepted_step(trainer(tiny, synthetic, tmp_path / "plain", "cuda", mixed_precision,
                                            backend="reference"))
    if mixed_precision == "fp16":  # the scaler took part: its growth tracker (or its scale) moved
        assert fused.scaler.state_dict() != before, before
    exact = {a: record(trainer(tiny, synthetic, tmp_path / f"exact{i}", "cuda", backend="reference"), at=a)
             for i, a in enumerate({at, at_plain})}
    err, base = rel(got["grads"][0], exact[at]["grads"][0]), rel(plain["grads"][0], exact[at_plain]["grads"][0])
    assert err <= 2 * base + 1e-3, f"fused {mixed_precision} gradient error {err:.3g}, reference's {base:.3g}"
    assert abs(got["losses"][0] - exact[at]["losses"][0]) <= 2e-3 * exact[at]["losses"][0]
    assert rel(got["update"], exact[at]["update"]) < 0.3
