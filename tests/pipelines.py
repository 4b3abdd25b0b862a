"""The tiny instruct pipeline on any device, dtype and attention backend (the session fixtures are CPU fp32)."""
import torch


def tiny_pipeline(tiny, device: str, dtype: str, backend: str = "auto"):
    from ipadapter_instruct.engine import Pipeline
    pipe = Pipeline.from_pretrained(tiny["model"], image_encoder=tiny["image_encoder"], adapter=tiny["adapter"],
                                    device=device, dtype=dtype, attention_backend=backend)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def runs_triton(pipe) -> bool:
    """Whether every cross-attention of `pipe` launches the fused kernel (and the projector its fused blocks)."""
    # (backend: the registry's choice; impl may be the kernel behind its first-use check, engine/selfcheck.py)
    return pipe._fused_projector and all(p.backend == "triton" for p in pipe.cross.values())


def exact_fp32(monkeypatch) -> None:
    """fp32 references in full fp32 on a GPU: no TF32 convolutions (matmuls are fp32 by default)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def check_within_rule(got, plain, exact, what="", atol=1e-3):
    """The kernels' rule on a pipeline's output: the error of `got` against the fp32 `exact` at most twice
    that of `plain` (the plain PyTorch path in the same dtype), plus atol x the output's largest magnitude."""
    err = (got.float() - exact.float()).abs().max().item()
    base = (plain.float() - exact.float()).abs().max().item()
    assert err <= 2 * base + atol * exact.float().abs().max().item(), f"{what}: error {err:.3g}, plain {base:.3g}"
