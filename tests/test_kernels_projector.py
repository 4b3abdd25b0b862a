"""The fused projector kernels against their plain PyTorch references and the engine's nn.Modules.

Tolerance follows flash-attention's rule: a kernel's error against an fp32 reference is at most twice the
error of plain PyTorch in the same dtype, plus a small atol scaled by the reference's largest magnitude
(at least 1). Without a GPU the kernels run under the
Triton interpreter, so the shapes here are small and odd (non powers of two, several blocks with masks).
"""
import pytest
import torch

from conftest import DEVICE, gpu  # conftest turns on the interpreter (before kernels import) without a GPU
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.projector import InstructProjector, PerceiverAttention, ProjectorConfig
from ipadapter_instruct.engine.projector import feed_forward as feed_forward_module
from ipadapter_instruct.kernels.projector import perceiver_attention, perceiver_attention_ref, projector_forward
from ipadapter_instruct.kernels.projector_ff import feed_forward, feed_forward_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_rule(out, pt, ref, what):
    # out: the kernel in some dtype; pt: plain PyTorch in that dtype; ref: fp32 reference
    assert out.shape == ref.shape and out.dtype == pt.dtype, f"{what}: {out.shape} {out.dtype}, want {pt.dtype}"
    err = (out.float() - ref).abs().max().item()
    pt_err = (pt.float() - ref).abs().max().item()
    atol = ATOL[out.dtype] * max(1.0, ref.abs().max().item())  # fp32: PyTorch's own error is 0 by definition
    assert err <= 2 * pt_err + atol, f"{what} {out.dtype}: kernel error {err:.3g}, PyTorch's {pt_err:.3g}"


def randomize_norms(module, gen):
    # LayerNorms start at weight 1, bias 0: move them so the fused affine part is exercised
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
    return module


def attention_params(attn):
    return (attn.norm1.weight, attn.norm1.bias, attn.norm2.weight, attn.norm2.bias, attn.to_q.weight,
            attn.to_kv.weight, attn.to_out.weight)


def ff_params(ff):
    return ff[0].weight, ff[0].bias, ff[1].weight, ff[3].weight


def check_attention(b, n, nq, dim, heads, dim_head, expand, dtype):
    gen = torch.Generator().manual_seed(n * 1000 + dim)
    attn = randomize_norms(PerceiverAttention(dim, heads, dim_head), gen).to(DEVICE).eval()
    x = torch.randn(b, n, dim, generator=gen).to(DEVICE)
    latents = torch.randn(1 if expand else b, nq, dim, generator=gen).to(DEVICE).expand(b, -1, -1)
    with torch.no_grad():
        ref = perceiver_attention_ref(x, latents, *attention_params(attn), heads)
        torch.testing.assert_close(ref, attn(x, latents) + latents, atol=1e-5, rtol=1e-5)
        attn.to(dtype)
        x, latents = x.to(dtype), latents.to(dtype)
        out = perceiver_attention(x, latents, *attention_params(attn), heads)
        assert_rule(out, perceiver_attention_ref(x, latents, *attention_params(attn), heads), ref, "vs reference")
        assert_rule(out, attn(x, latents) + latents, ref, "vs PerceiverAttention")


def check_feed_forward(b, nq, dim, mult, dtype):
    gen = torch.Generator().manual_seed(dim * 10 + mult)
    ff = randomize_norms(feed_forward_module(dim, mult), gen).to(DEVICE).eval()
    latents = torch.randn(b, nq, dim, generator=gen).to(DEVICE)
    with torch.no_grad():
        ref = feed_forward_ref(latents, *ff_params(ff))
        torch.testing.assert_close(ref, ff(latents) + latents, atol=1e-5, rtol=1e-5)
        ff.to(dtype)
        latents = latents.to(dtype)
        out = feed_forward(latents, *ff_params(ff))
        assert_rule(out, feed_forward_ref(latents, *ff_params(ff)), ref, "vs reference")
        assert_rule(out, ff(latents) + latents, ref, "vs feed_forward module")


def check_projector(cfg, b, n_image, n_instruct, n_prompt, dtype):
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    module = randomize_norms(InstructProjector(cfg), gen).to(DEVICE).eval()
    image = torch.randn(b, n_image, cfg.image_dim, generator=gen).to(DEVICE)
    text_dim = cfg.text_dim or 8
    instruct = torch.randn(b, n_instruct, text_dim, generator=gen).to(DEVICE)
    prompt = torch.randn(b, n_prompt, text_dim, generator=gen).to(DEVICE)
    with torch.no_grad():
        ref = module(image, instruct, prompt)
        module.to(dtype)
        image, instruct, prompt = image.to(dtype), instruct.to(dtype), prompt.to(dtype)
        out = projector_forward(module, image, instruct, prompt)
        assert_rule(out, module(image, instruct, prompt), ref, "vs InstructProjector")


# (B, N context tokens, Q queries, dim, heads, dim_head, latents expanded over the batch as in layer 0)
ATTENTION_SHAPES = [(2, 7, 5, 48, 3, 16, False), (1, 37, 4, 100, 2, 32, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=str)
def test_perceiver_attention(shape, dtype):
    check_attention(*shape, dtype)


# (B, Q, dim, mult): B*Q = 21 spans two row blocks, hidden 200 ends in a partial block, dim 100 two K chunks
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 48, 4), (3, 7, 100, 2)], ids=str)
def test_feed_forward(shape, dtype):
    check_feed_forward(*shape, dtype)


TINY = dict(dim=48, depth=2, heads=3, num_queries=5, image_dim=40, output_dim=32, ff_mult=4)


@pytest.mark.parametrize("kind, dtype", [("instruct", torch.float32), ("instruct", torch.bfloat16),
                                         ("plus", torch.float32), ("plus", torch.float16)], ids=str)
def test_projector_forward_matches_module(kind, dtype):
    # PerceiverAttention's dim_head is fixed at 64 inside InstructProjector: 3 heads make 192 inner on dim 48
    cfg = ProjectorConfig(**TINY, text_dim=24 if kind == "instruct" else None)
    check_projector(cfg, 2, 7, 6, 9, dtype)


def test_projector_forward_needs_instruction_and_prompt():
    module = InstructProjector(ProjectorConfig(**TINY, text_dim=24)).to(DEVICE)
    with pytest.raises(EngineError, match="instruction and prompt"):
        projector_forward(module, torch.randn(1, 3, 40, device=DEVICE), None, torch.randn(1, 2, 24, device=DEVICE))


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    latents = torch.randn(1, 4, 32)
    args = (torch.ones(32), torch.zeros(32), torch.randn(64, 32), torch.randn(32, 64))
    with pytest.raises(EngineError, match="fused feed-forward block cannot run: CPU tensors"):
        feed_forward(latents, *args)
    attn = PerceiverAttention(32, 2, 16)
    with pytest.raises(EngineError, match="fused Perceiver attention cannot run: CPU tensors"):
        perceiver_attention(torch.randn(1, 3, 32), latents, *attention_params(attn), 2)


def test_mixed_dtypes_are_refused():
    ff = feed_forward_module(32, 2).to(DEVICE)
    latents = torch.randn(1, 4, 32, device=DEVICE, dtype=torch.float16)
    with pytest.raises(EngineError, match="one dtype"):
        feed_forward(latents, *ff_params(ff))


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [257, 77])
def test_sd15_perceiver_attention(n, dtype):
    check_attention(4, n, 16, 768, 12, 64, False, dtype)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mult", [4, 2])
def test_sd15_feed_forward(mult, dtype):
    check_feed_forward(4, 16, 768, mult, dtype)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("preset", ["sd15", "sd15-plus"])
def test_sd15_projector_forward(preset, dtype):
    check_projector(ProjectorConfig.preset(preset), 4, 257, 77, 77, dtype)
