"""The encodings that are constants of a pipeline's weights (engine/encoding.py): the all-zero image's CLIP row and the
fixed instructions "" and "everything" are encoded once per pipeline, give what encoding them each call gives, and
the fixed instructions are encoded again after a LoRA changes the text encoder."""
import pytest
import torch

from conftest import NEGATIVE, PROMPT, load_pipe

STEPS = 2


def rows_seen(module) -> list[int]:
    """The batch size of every forward call of `module`, appended as they happen."""
    seen = []
    module.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(
        (args[0] if args else next(iter(kwargs.values()))).shape[0]), with_kwargs=True)
    return seen


def run(pipe, image, mode="full"):
    return pipe(PROMPT, image=image, instruct="the red object", negative_prompt=NEGATIVE, guidance_mode=mode,
                num_inference_steps=STEPS, seed=3, output_type="latent").images


def test_zero_image_is_encoded_once_and_is_the_encoders_own(tiny, cond_image):
    pipe = load_pipe(tiny, tiny["adapter"])
    seen = rows_seen(pipe.image_encoder)
    first = run(pipe, cond_image)
    assert sorted(seen) == [1, 1]  # the condition image, and the zero image the first time
    seen.clear()
    assert torch.equal(run(pipe, cond_image), first)
    assert seen == [1]  # the second call: the condition image only
    pixels = torch.zeros_like(pipe.image_processor(images=[cond_image], return_tensors="pt").pixel_values)
    with torch.inference_mode():
        own = pipe.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
    assert torch.equal(pipe.zero_image_row(pooled=False), own)


def test_plain_adapters_zero_row_is_zeros(tiny):
    pipe = load_pipe(tiny, tiny["adapter"])
    row = pipe.zero_image_row(pooled=True)
    assert row.shape == (1, pipe.image_encoder.config.projection_dim) and not row.any()


def test_fixed_instructions_once_and_again_after_a_lora(tiny, cond_image, tmp_path):
    from ipadapter_instruct.engine.tiny_parts import tiny_lora

    pipe = load_pipe(tiny, tiny["adapter"])
    seen = rows_seen(pipe.text_encoder)
    before = run(pipe, cond_image)
    assert sorted(seen) == [1, 1, 3]  # "" and "everything" alone, once; prompt, negative and instruction together
    seen.clear()
    assert torch.equal(run(pipe, cond_image), before) and seen == [3]

    lora = tmp_path / "lora.safetensors"
    tiny_lora(str(lora), tiny["model"], 0)
    pipe.load_lora_weights(lora, scale=1.0)
    seen.clear()
    after = run(pipe, cond_image)
    assert sorted(seen) == [1, 1, 3]  # the fixed instructions again, through the changed text encoder
    fresh = load_pipe(tiny, tiny["adapter"])
    fresh.load_lora_weights(lora, scale=1.0)
    torch.testing.assert_close(after, run(fresh, cond_image), atol=1e-6, rtol=0)
    assert (after - before).abs().max() > 1e-3  # the LoRA changes the images, or this proves nothing


@pytest.mark.parametrize("mode", ["simple", "full"])
def test_fixed_texts_equal_encoding_them_each_call(tiny, cond_image, mode):
    """The constants give the numbers encoding every text each call gives (the server's cache, off here, does the
    same for every text)."""
    from ipadapter_instruct.engine.encoding import ModelConstants

    class Fresh(ModelConstants):  # no constants: every text and the zero image encoded in each call
        def get(self, key, compute):
            return compute()

    pipe = load_pipe(tiny, tiny["adapter"])
    run(pipe, cond_image, mode)
    cached = run(pipe, cond_image, mode)  # (read from the constants the first call stored)
    pipe.__dict__["_constants"] = Fresh()
    torch.testing.assert_close(run(pipe, cond_image, mode), cached, atol=1e-5, rtol=0)
