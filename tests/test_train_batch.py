"""The trainer's per-example randomness, read directly off one micro-batch (not through "the loss goes down"):
the conditioning dropout's rules (an image drop zeroes the CLIP pixels and clears the instruction, a text drop
clears the caption, both clear all three), and every example of a micro-batch drawing its own dropout decision,
timestep, noise and VAE sample from its own seed (train/loop.py: Trainer.loss, Trainer._seeds)."""
import pytest
import torch

from ipadapter_instruct.train.loop import DROP_BOTH, DROP_IMAGE, DROP_TEXT

RES = 32  # tiny VAE factor 4: 8x8 latents
BATCH = 4


@pytest.fixture(scope="module")
def tr(tiny, tmp_path_factory):
    from ipadapter_instruct.train.data import make_synthetic
    from ipadapter_instruct.train.loop import TrainConfig, Trainer
    folder = tmp_path_factory.mktemp("batch")
    data = make_synthetic(str(folder / "data"), 12, seed=0, size=48)
    cfg = TrainConfig(model=tiny["model"], image_encoder=tiny["image_encoder"], data=data, out=str(folder / "out"),
                      init_adapter=tiny["adapter"], batch_size=BATCH, lr=1e-3, resolution=RES, warmup_steps=1,
                      val_fraction=0.2, device="cpu", progress=False)
    return Trainer(cfg)


@pytest.fixture
def seen(tr, monkeypatch):
    """What the next micro-batches feed the encoders and the noising: the batch as drawn (before dropout), the
    texts encoded (captions, then instructions), the CLIP pixels, and add_noise's latents, noise and timesteps."""
    got = {"batches": [], "texts": [], "clip": [], "noised": []}
    next_batch, encode_text, add_noise = tr._next_batch, tr._encode_text, tr.noise_sched.add_noise

    def drawn():
        batch, slots = next_batch()
        got["batches"].append(dict(batch, clip_pixels=batch["clip_pixels"].clone()))  # loss() zeroes rows in place
        return batch, slots

    def texts(t):
        got["texts"].append(list(t))
        return encode_text(t)

    def noised(latents, noise, t):
        got["noised"].append((latents.clone(), noise.clone(), t.clone()))
        return add_noise(latents, noise, t)

    monkeypatch.setattr(tr, "_next_batch", drawn)
    monkeypatch.setattr(tr, "_encode_text", texts)
    monkeypatch.setattr(tr.noise_sched, "add_noise", noised)
    hook = tr.image_encoder.register_forward_pre_hook(lambda m, args: got["clip"].append(args[0].clone()))
    yield got
    hook.remove()


def decision(seed: int) -> str:
    """The dropout an example with this seed gets, by the documented rates: its generator's first draw r in
    [0, .05) drops the image, [.05, .10) the text, [.10, .15) both."""
    r = torch.rand((), generator=torch.Generator().manual_seed(seed)).item()
    for name, upto in (("image", DROP_IMAGE), ("text", DROP_IMAGE + DROP_TEXT),
                       ("both", DROP_IMAGE + DROP_TEXT + DROP_BOTH)):
        if r < upto:
            return name
    return "none"


def test_dropout_rules_and_each_example_its_own_decision(tr, seen):
    """At an optimizer step whose micro-batch holds one example of each decision (none, image, text, both): each
    example is dropped by its own decision, and dropping the image clears its instruction too (the engine's
    unconditional branch: zero image, empty instruction), the caption staying."""
    slots = list(range(BATCH))
    step = None
    for s in range(5000):  # the trainer's own seeds for (step s, micro-step 0, these slots)
        tr.step = s
        if len({decision(x) for x in tr._seeds(0, slots)}) == 4:
            step = s
            break
    assert step is not None, "no step in 5000 whose micro-batch holds all four dropout decisions: one seed for all?"
    tr.step = step
    decisions = [decision(x) for x in tr._seeds(0, slots)]
    tr.train_step()
    (batch,), (captions, instructions), (clip,) = seen["batches"], seen["texts"], seen["clip"]
    assert all(batch["caption"]) and all(batch["instruction"])  # something to clear
    for i, d in enumerate(decisions):
        image_dropped, text_dropped = d in ("image", "both"), d in ("text", "both")
        assert bool((clip[i] == 0).all()) == image_dropped, (i, d)
        if not image_dropped:
            assert torch.equal(clip[i], batch["clip_pixels"][i]), (i, d)
        assert instructions[i] == ("" if image_dropped else batch["instruction"][i]), (i, d, instructions[i])
        assert captions[i] == ("" if text_dropped else batch["caption"][i]), (i, d, captions[i])


def test_each_example_draws_its_own_noise_timestep_and_vae_sample(tr, seen):
    """One micro-batch: the examples' noise and timesteps all differ, and each example's noise, timestep and VAE
    sample are what its own seed gives it alone (so its randomness does not depend on its neighbours)."""
    tr.step = 0
    seeds = tr._seeds(0, list(range(BATCH)))
    assert len(set(seeds)) == BATCH
    tr.train_step()
    (batch,), ((latents, noise, t),) = seen["batches"], seen["noised"]
    assert len(set(t.tolist())) == BATCH, t
    for i in range(BATCH):
        for j in range(i):
            assert (noise[i] - noise[j]).abs().max() > 0.1, (i, j)
    with torch.no_grad():
        for i in (1, BATCH - 1):  # (two of them, to stay cheap; slot 0's seed is also the first seed)
            alone = {k: v[i:i + 1] for k, v in batch.items()}
            tr.loss(alone, [seeds[i]], tr.net)
            a_latents, a_noise, a_t = seen["noised"][-1]
            assert torch.equal(a_noise[0], noise[i]) and a_t[0] == t[i], i
            torch.testing.assert_close(a_latents[0], latents[i], atol=1e-4, rtol=1e-4)
