"""The model-kind registry (engine/registry.py): one table from (kind, runtime) to the class that runs it, one
load_pipeline(config) for every entry point, and capabilities as data."""
import argparse

import pytest

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.registry import KINDS, PIPELINES, Capabilities, EngineConfig, load_pipeline, pipeline_class


def test_every_table_entry_names_a_class_of_its_kind_and_runtime():
    for (kind, runtime), target in PIPELINES.items():
        cls = pipeline_class(kind, runtime)
        assert cls.KIND == kind and cls.RUNTIME == runtime, (target, cls.KIND, cls.RUNTIME)


@pytest.mark.parametrize("kind, runtime, message", [
    ("sd3", "torch", "unknown model kind 'sd3'"), ("sd15", "openvino", "unknown runtime 'openvino'"),
    ("edit", "tensorrt", "the edit model kind on tensorrt is not built yet; edit runs on torch, onnx")])
def test_unknown_or_unbuilt_pairs_are_one_line(kind, runtime, message):
    with pytest.raises(EngineError, match=message):
        pipeline_class(kind, runtime)


def test_config_from_cli_arguments():
    args = argparse.Namespace(model="m", adapter=["a.bin", "b.bin"], lora=[("l.safetensors", 0.5)], steps=3)
    c = EngineConfig.from_args(args, compile=True)
    assert (c.model, c.adapter, c.lora, c.compile) == ("m", ("a.bin", "b.bin"), (("l.safetensors", 0.5),), True)


def test_load_pipeline_picks_the_kind_from_the_model(tiny, tmp_path_factory):
    from ipadapter_instruct.engine.tiny import make_tiny
    pipe = load_pipeline(EngineConfig(model=tiny["model"], image_encoder=tiny["image_encoder"],
                                      adapter=(tiny["adapter"],), device="cpu", compile=True))
    assert type(pipe).__name__ == "Pipeline" and pipe.kind == "sd15" and pipe._compiled
    assert pipe.capabilities == Capabilities(kind="sd15", runtime="torch", adapters=("instruct",), controlnets=0,
                                             per_row_adapter=True, step_batching=True, size_conditioning=False)
    assert pipe.capabilities.instruct
    edit = make_tiny(str(tmp_path_factory.mktemp("registry-edit") / "tiny"), edit=True)
    pipe = load_pipeline(EngineConfig(model=edit["model"], device="cpu"))
    assert type(pipe).__name__ == "EditPipeline" and pipe.kind == "edit" and pipe.capabilities.adapters == ()
    with pytest.raises(EngineError, match="InstructPix2Pix model"):
        load_pipeline(EngineConfig(model=edit["model"], device="cpu", kind="sd15"))
    assert set(KINDS) == {k for k, _ in PIPELINES}
