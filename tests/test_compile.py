"""torch.compile over the UNet with the adapter processors: one graph (sdpa), same latents, no recompiles."""
import torch

from conftest import PROMPT, gpu


def test_compiled_unet_is_one_graph_and_gives_the_same_latents(tiny, cond_image):
    from ipadapter_instruct.engine import Pipeline
    pipe = Pipeline.from_pretrained(tiny["model"], image_encoder=tiny["image_encoder"], adapter=tiny["adapter"],
                                    device="cpu", attention_backend="sdpa")
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt=PROMPT, image=cond_image, instruct="use the composition", num_inference_steps=2, seed=3,
                output_type="latent")
    eager, eager_other = pipe(**call), pipe(**{**call, "scale": 0.3, "guidance_mode": "full"})
    torch._dynamo.reset()
    # fullgraph: any graph break (in our processors, the AdapterContext kwargs, the per-row scales) is an error;
    # the eager backend checks the capture without paying for code generation on this CPU
    pipe.compile(fullgraph=True, backend="eager")
    assert torch.equal(pipe(**call), eager)
    # another scale and 4 guidance rows: new values and a new batch shape through the same compiled module
    assert torch.equal(pipe(**{**call, "scale": 0.3, "guidance_mode": "full"}), eager_other)
    assert not torch.equal(eager, eager_other)


def two_requests(cond_image, steps):
    call = dict(prompt=PROMPT, image=cond_image, instruct="use the composition", num_inference_steps=steps, seed=3,
                output_type="latent")
    return call, {**call, "prompt": "a blue boat", "scale": 0.3, "seed": 4}


def eager_then_compiled(pipe, cond_image, steps):
    """Two requests of one shape, eager then after pipe.compile(); the second compiled one adds no graph."""
    from torch._dynamo.utils import counters

    call, other = two_requests(cond_image, steps)
    eager = pipe(**call), pipe(**other)
    torch._dynamo.reset()
    counters.clear()
    pipe.compile()
    compiled = pipe(**call)
    graphs = counters["stats"]["unique_graphs"]
    compiled = compiled, pipe(**other)
    assert graphs >= 1 and counters["stats"]["unique_graphs"] == graphs  # new values, same shape: nothing new
    return eager, compiled


def test_inductor_compiled_unet_gives_the_same_latents_and_never_recompiles_for_new_values(tiny, cond_image):
    """The real default (inductor, generating C++ on this CPU; `python -m bench --compile` uses it): same
    latents as eager within fp32 rounding, and a request with other values at the same shape reuses the code."""
    from ipadapter_instruct.engine import Pipeline
    pipe = Pipeline.from_pretrained(tiny["model"], image_encoder=tiny["image_encoder"], adapter=tiny["adapter"],
                                    device="cpu", attention_backend="sdpa")
    pipe.set_progress_bar_config(disable=True)
    (eager, eager_other), (compiled, compiled_other) = eager_then_compiled(pipe, cond_image, steps=2)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(compiled_other, eager_other, atol=1e-4, rtol=1e-4)


@gpu
def test_compiled_unet_with_triton_kernels_on_gpu(tiny, cond_image, monkeypatch):
    """compile() with the triton backend: the kernel launches stay outside the graphs (torch.compiler.disable),
    the latents equal the uncompiled triton path's by the kernels' rule (the compiled fp16 error against an fp32
    reference at most twice the uncompiled one's) and a second request at the same shape compiles nothing new.
    GPU only: under the interpreter the same test (dynamo's eager backend, bitwise equal) passed but took 5 min
    here, the interpreted kernels being far slower under dynamo's frame hooks than uncompiled."""
    from pipelines import check_within_rule, exact_fp32, runs_triton, tiny_pipeline
    pipe = tiny_pipeline(tiny, "cuda", "float16", "triton")
    assert runs_triton(pipe)
    (eager, eager_other), (compiled, compiled_other) = eager_then_compiled(pipe, cond_image, steps=3)
    assert not torch.equal(compiled, compiled_other)
    exact_fp32(monkeypatch)
    exact_pipe = tiny_pipeline(tiny, "cuda", "float32", "reference")
    call, other = two_requests(cond_image, steps=3)
    check_within_rule(compiled, eager, exact_pipe(**call), "compiled")
    check_within_rule(compiled_other, eager_other, exact_pipe(**other), "compiled, second request")


def test_compile_says_the_next_call_compiles_and_how_long_it_took(tiny, caplog):
    import logging

    from ipadapter_instruct.engine import Pipeline
    pipe = Pipeline.from_pretrained(tiny["model"], device="cpu", attention_backend="sdpa")
    pipe.set_progress_bar_config(disable=True)
    torch._dynamo.reset()
    with caplog.at_level(logging.INFO, logger="ipadapter_instruct.engine"):
        pipe.compile(backend="eager")  # the eager backend: the capture without code generation on this CPU
        assert [r.getMessage() for r in caplog.records] == [
            "the UNet is torch.compiled: the next call compiles it (on the CPU this can take minutes)"]
        pipe(PROMPT, num_inference_steps=2, seed=0, output_type="latent")
        pipe(PROMPT, num_inference_steps=2, seed=1, output_type="latent")  # same shape: nothing more
    timed = [r for r in caplog.records if "compiled UNet: the first step at" in r.getMessage()]
    assert len(timed) == 1 and timed[0].levelno == logging.WARNING, caplog.text
    assert "rows 2" in timed[0].getMessage() and "(compiling included)" in timed[0].getMessage()
