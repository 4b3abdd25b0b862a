"""torch.compile over the UNet with the adapter processors: one graph, same latents."""
import torch

from conftest import PROMPT


def test_compiled_unet_is_one_graph_and_gives_the_same_latents(tiny, cond_image):
    from engine import Pipeline
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
