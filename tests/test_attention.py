"""The decoupled cross-attention processors: scale 0 is exactly the base UNet; per-row scales are per row."""
import pytest
import torch

from ipadapter_instruct.engine.attention import AdapterContext, precompute_kv


@pytest.fixture(scope="module")
def base_unet(tiny):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(tiny["model"], subfolder="unet").eval()


def inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    text = torch.randn(batch, 77, 32, generator=g)
    ip = torch.randn(batch, 4, 32, generator=g)
    return x, text, ip


def forward(pipe, x, text, ip, scales):
    ctx = AdapterContext(kv=precompute_kv(pipe.unet, pipe.cross, text, ip),
                         scale={n: torch.tensor(scales).view(-1, 1, 1, 1) for n in pipe.cross})
    return pipe.unet(x, 500, encoder_hidden_states=text, cross_attention_kwargs={"adapter": ctx}).sample


@torch.no_grad()
def test_scale_zero_is_bitwise_the_base_unet(instruct_pipe, base_unet):
    x, text, ip = inputs(3)
    want = base_unet(x, 500, encoder_hidden_states=text).sample
    assert torch.equal(forward(instruct_pipe, x, text, ip, [0.0, 0.0, 0.0]), want)
    # with no adapter context the processors are plain cross-attention too
    assert torch.equal(instruct_pipe.unet(x, 500, encoder_hidden_states=text).sample, want)
    assert not torch.allclose(forward(instruct_pipe, x, text, ip, [1.0, 1.0, 1.0]), want, atol=1e-3)


@torch.no_grad()
def test_per_row_scales(instruct_pipe):
    x, text, ip = inputs(2, seed=1)
    both = forward(instruct_pipe, x, text, ip, [0.3, 1.2])
    first = forward(instruct_pipe, x[:1], text[:1], ip[:1], [0.3])
    second = forward(instruct_pipe, x[1:], text[1:], ip[1:], [1.2])
    torch.testing.assert_close(both, torch.cat([first, second]), atol=1e-5, rtol=1e-5)
    swapped = forward(instruct_pipe, x, text, ip, [1.2, 0.3])
    assert not torch.allclose(both, swapped, atol=1e-3)
