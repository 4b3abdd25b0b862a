"""Several requests in one call: one UNet batch per step, and each image as if it ran alone."""
import pytest
import torch
from conftest import NEGATIVE, PROMPT

from ipadapter_instruct.engine import EngineError

STEPS = 3


def test_batch_of_requests_equals_each_alone(instruct_pipe, cond_image, other_image):
    reqs = [dict(prompt=PROMPT, image=cond_image, instruct="use the style of this image", scale=0.6, seed=1),
            dict(prompt="a blue car", image=other_image, instruct="take the object", scale=1.1, seed=2)]
    kw = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, output_type="latent", num_images_per_prompt=2)
    together = instruct_pipe(**{k: [r[k] for r in reqs] for k in reqs[0]}, **kw)
    alone = torch.cat([instruct_pipe(**r, **kw) for r in reqs])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_one_unet_call_per_step_with_all_branches(instruct_pipe, cond_image, other_image):
    seen = []
    hook = instruct_pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    try:
        instruct_pipe([PROMPT, PROMPT], [cond_image, other_image], ["use the style", "take the object"],
                      num_inference_steps=STEPS, num_images_per_prompt=2, seed=0, output_type="latent",
                      scheduler="ddim")
    finally:
        hook.remove()
    assert seen == [(2 + 4) * 2] * STEPS  # simple (2 branches) + full (4), two images each, every step


def test_pil_output_count_and_size(instruct_pipe, cond_image):
    out = instruct_pipe([PROMPT, "a tree"], cond_image, "take the object", num_inference_steps=1,
                        num_images_per_prompt=3, seed=[5, 6])
    assert len(out) == 6 and all(im.size == (64, 64) for im in out)  # order: test_batch_of_requests_equals_each_alone


def test_same_seed_same_image_different_seed_different(instruct_pipe, cond_image):
    run = lambda s: instruct_pipe(PROMPT, cond_image, "take the object", num_inference_steps=2, seed=s,  # noqa: E731
                                  output_type="latent")
    assert torch.equal(run(9), run(9))
    assert not torch.allclose(run(9), run(10))


@pytest.mark.parametrize("kwargs,message", [
    (dict(height=30), "multiples of the VAE factor 4, got 30x64"),
    (dict(num_inference_steps=0), "steps must be a positive integer"),
    (dict(scheduler="heun"), "unknown scheduler 'heun'"),
    (dict(instruct="   "), "instruction is empty"),
    (dict(image=None), "condition image is required"),
    (dict(prompt=["a", "b"], seed=[1, 2, 3]), "one length"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (dict(scale={"sideways": 1.0}), "bad per-block adapter scale"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be a positive integer"),
])
def test_bad_input_names_the_problem(instruct_pipe, cond_image, kwargs, message):
    args = dict(prompt=PROMPT, image=cond_image, instruct="take the object", num_inference_steps=1, seed=0)
    args.update(kwargs)
    with pytest.raises(EngineError, match=message) as err:
        instruct_pipe(**args)
    assert "\n" not in str(err.value)


def test_shared_condition_image_encoded_once(instruct_pipe, cond_image):
    instruct_pipe.zero_image_row(pooled=False)  # (the zero image: once per pipeline, tests/test_model_constants.py)
    seen = []
    hook = instruct_pipe.image_encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    try:
        instruct_pipe(["a", "b", "c"], cond_image, "take the object", num_inference_steps=1, output_type="latent")
    finally:
        hook.remove()
    assert seen == [1]  # the one image the three requests share, once


def test_plus_adapter_warns_that_it_ignores_the_instruction(plus_pipe, cond_image, caplog):
    with caplog.at_level("WARNING", logger="ipadapter_instruct.engine.pipeline"):
        plus_pipe(PROMPT, cond_image, "take the object", num_inference_steps=1, output_type="latent")
    assert "is ignored" in caplog.text


def test_step_invariant_work_runs_once_per_request(instruct_pipe, cond_image):
    # encoders, projector and every encoder-side K/V projection (text and adapter) run once per call; only the
    # UNet's own work repeats per step
    pipe, counts = instruct_pipe, {}
    watched = {"text_encoder": pipe.text_encoder, "image_encoder": pipe.image_encoder,
               "projector": pipe.adapter.projector, "unet": pipe.unet}
    modules = dict(pipe.unet.named_modules())
    for name in pipe.cross:
        attn = name[: -len(".processor")]
        watched[f"{attn}.to_k"], watched[f"{attn}.to_v"] = modules[f"{attn}.to_k"], modules[f"{attn}.to_v"]
        watched[f"{attn}.to_k_ip"], watched[f"{attn}.to_v_ip"] = pipe.cross[name].to_k_ip, pipe.cross[name].to_v_ip
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: counts.__setitem__(n, counts.get(n, 0) + 1))
             for n, m in watched.items()]
    try:
        pipe(PROMPT, cond_image, "use the style", num_inference_steps=5, seed=0, output_type="latent",
             scheduler="ddim")
    finally:
        for h in hooks:
            h.remove()
    assert counts.pop("unet") == 5
    assert counts == {n: 1 for n in watched if n != "unet"}
