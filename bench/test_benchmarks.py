"""pytest-benchmark suite over the same functions as `python -m bench`, for regression tracking:

    pytest bench/ --benchmark-only [--benchmark-autosave] [--benchmark-compare]

Tiny preset on the CPU by default; BENCH_PRESET=sd15 and a GPU for the real shapes.
"""
import os

import pytest
import torch

from ipadapter_instruct.bench.e2e import wrong_images
from ipadapter_instruct.bench.e2e_config import PROVIDERS, E2EConfig
from ipadapter_instruct.bench.e2e_providers import DiffusersProvider, EngineProvider
from ipadapter_instruct.bench.ops import ATTENTION_SHAPES, attention_inputs, attention_providers, wrong_output
from ipadapter_instruct.kernels import decoupled_attention_ref
from ipadapter_instruct.bench.weights import bench_weights

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32
PRESET = os.environ.get("BENCH_PRESET", "tiny")


@pytest.fixture(scope="module")
def image():
    from ipadapter_instruct.engine.demo import draw_condition_image
    return draw_condition_image(256)


@pytest.fixture(scope="module", params=PROVIDERS)
def provider(request):
    cfg = E2EConfig(preset=PRESET, device=str(DEVICE), dtype=str(DTYPE).removeprefix("torch."),
                    steps=30 if DEVICE.type == "cuda" else 4)
    paths = bench_weights(PRESET)
    if request.param == "diffusers":
        return DiffusersProvider(paths, DEVICE, DTYPE, cfg)
    return EngineProvider(request.param, paths, DEVICE, DTYPE, cfg)


def test_e2e_request(benchmark, provider, image):
    def call():
        out = provider(image, 1)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out
    assert wrong_images(call(), 1) is None  # the warm-up: a provider whose output is wrong gets no timing
    assert wrong_images(benchmark(call), 1) is None


@pytest.mark.parametrize("lq, d", ATTENTION_SHAPES)
@pytest.mark.parametrize("name", ["fused", "two-sdpa", "xformers"])
def test_decoupled_attention(benchmark, name, lq, d):
    fns, skipped = attention_providers(DEVICE, None, DTYPE)
    if name not in fns:
        pytest.skip(skipped[name])
    args = attention_inputs(2, lq, d, DEVICE, DTYPE)

    def call():
        out = fns[name](*args)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out
    exact, plain = decoupled_attention_ref(*[a.float() for a in args]), decoupled_attention_ref(*args)
    assert wrong_output(call(), plain, exact) is None  # checked against the reference before it is timed
    assert wrong_output(benchmark(call), plain, exact) is None
