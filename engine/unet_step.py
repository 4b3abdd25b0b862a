"""How a pipeline runs its UNet step and which kernels it runs: eagerly, torch.compiled, or replayed from CUDA graphs
(engine/cuda_graphs.py), each fast form checked against its eager path at its first use of a shape (engine/selfcheck.py);
the attention backend's choice carried to the projector, GroupNorm+SiLU and GEGLU kernels (engine/fastpath.py)."""
from __future__ import annotations

import logging
import time

import torch

from ipadapter_instruct.kernels import BACKENDS, choose

from ipadapter_instruct.engine import fastpath
from ipadapter_instruct.engine.attention import choose_impls
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.cuda_graphs import StaticUNet
from ipadapter_instruct.engine.selfcheck import describe, module_fp32

log = logging.getLogger(__name__)

# what replays or compiles the UNet step, by (CUDA graphs, compiled): a component of the first-use checks
STEP_COMPONENTS = {(True, False): "cuda_graph", (False, True): "compiled_unet", (True, True): "compiled_unet+cuda_graph"}


def step_component(pipe) -> str | None:
    return STEP_COMPONENTS.get((pipe._static is not None, pipe._compiled))


def graphs_changed(pipe) -> None:
    """Graphs captured or compiled before are stale (other kernels or weights): drop them and their verdicts."""
    if pipe._static is not None:
        pipe._static.entries.clear()
    pipe.selfcheck.forget(*STEP_COMPONENTS.values())


def compile_unet(pipe, **kwargs) -> None:
    """pipe.compile(): torch.compile the UNet in place, saying that the next call compiles (minutes on a CPU)."""
    pipe.unet.compile(**kwargs)
    pipe._compiled = True
    pipe._compiled_shapes = set()  # step shapes run since: the first of each pays (and logs) its compile time
    graphs_changed(pipe)  # graphs captured before hold the uncompiled kernels
    log.warning("the UNet is torch.compiled: the next call compiles it%s",
                " (on the CPU this can take minutes)" if pipe.device.type == "cpu" else "")


def timed_first(pipe, key, fast, shape: str):
    """`fast` for a step shape the compiled UNet has not run: its time (compiling included) logged once."""
    def run():
        start = time.perf_counter()
        out = fast()
        pipe._compiled_shapes.add(key)
        level = logging.WARNING if len(pipe._compiled_shapes) == 1 else logging.INFO
        log.log(level, "compiled UNet: the first step at %s took %.1f s (compiling included)", shape,
                time.perf_counter() - start)
        return out
    return run


def choose_kernels(pipe, backend: str) -> None:
    """Every cross-attention on `backend`; where that is triton, the projector, GroupNorm+SiLU and GEGLU too."""
    if backend not in BACKENDS:
        raise EngineError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    choose_impls(pipe.unet, pipe.cross, pipe.device, pipe.dtype, backend, pipe.selfcheck)
    pipe.attention_backend = backend
    graphs_changed(pipe)  # graphs captured before hold the previous backend's kernels
    # the other fused kernels follow the same choice: the projector's blocks (head size 64 in every
    # released checkpoint), GroupNorm+SiLU in the UNet's, VAE's and ControlNets' resnets, GEGLU
    fused = choose(pipe.device, pipe.dtype, 64, backend) == "triton"
    # every adapter's projector but a plain one's (a Linear + LayerNorm)
    pipe._fused_projector = fused and any(a.kind != "plain" for a in pipe.adapters)
    for m in (pipe.unet, pipe.vae, *pipe.controlnets):
        if fused:
            fastpath.fuse(m, pipe.selfcheck)
        else:
            fastpath.unfuse(m)


def fast_path_report(pipe) -> dict:
    fused = {"decoupled_attention": sorted({p.backend for p in pipe.cross.values()}) or ["none"],
             "group_norm_silu": "triton" if fastpath.fused(pipe.unet) else "pytorch",
             "projector": "triton" if pipe._fused_projector else "pytorch",
             "unet_step": step_component(pipe) or "eager"}
    fused["geglu"] = fused["group_norm_silu"]
    return pipe.selfcheck.report(fused)


def unet_call(unet, x, t, text_rows, ctx, control=None, added=None) -> torch.Tensor:
    extra = {} if control is None else dict(down_block_additional_residuals=control[0],
                                            mid_block_additional_residual=control[1])
    if added is not None:
        extra["added_cond_kwargs"] = added
    return unet(x, t, encoder_hidden_states=text_rows, return_dict=False,
                cross_attention_kwargs={"adapter": ctx}, **extra)[0]


def run_unet(pipe, x, t, text_rows, ctx, control=None, added=None) -> torch.Tensor:
    # x: (rows, C, h, w) -> noise prediction per row; control: ControlNet (down, mid) residuals or None;
    # added: SDXL's added conditioning per row ({"text_embeds", "time_ids"}) or None
    step, unet = step_component(pipe), pipe.unet
    if step is None:
        return unet_call(unet, x, t, text_rows, ctx, control, added)

    def fast():  # CUDA graphs: static buffers (the residuals, SDXL's added conditioning), replayed
        if pipe._static is not None:
            return pipe._static(x, t, text_rows, ctx, control, added)
        return unet_call(unet, x, t, text_rows, ctx, control, added)

    eager = lambda: unet_call(unet._call_impl, x, t, text_rows, ctx, control, added)  # noqa: E731
    ref = None if pipe.dtype == torch.float32 else \
        lambda: unet_call(lambda *a, **k: module_fp32(unet, *a, **k), x, t, text_rows, ctx, control, added)
    key = StaticUNet._key(x, t, text_rows, ctx, control, added)
    shape = f"rows {x.shape[0]}, latent {describe(x)}"
    if pipe._compiled and key not in pipe._compiled_shapes:
        fast = timed_first(pipe, key, fast, shape)
    return pipe.selfcheck.run(step, key, fast, eager, ref, pipe.dtype, pipe.device, shape=shape)
