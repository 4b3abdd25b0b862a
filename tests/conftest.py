"""Shared fixtures: tiny random weights written once per session in the real on-disk formats."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton reads TRITON_INTERPRET when a kernel is decorated: set it before anything imports `kernels`.
# Without a GPU the kernels then run (slowly) on CPU tensors; with one they run for real on CUDA.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# under pytest-xdist (`make test` runs TEST_WORKERS processes) the cores are shared out, not each claimed by every
# worker's intra-op pool: oversubscribed OpenMP threads spin and slow every worker down
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
# GPU-only tests carry this marker: they skip without CUDA (below) and `pytest -m gpu` selects them on a GPU machine
gpu = pytest.mark.gpu
GPU_SKIP = "needs a CUDA GPU (kernels, graphs and fp16 at real shapes)"

PROMPT = "a red house by a lake"
NEGATIVE = "blurry, low quality"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    from ipadapter_instruct.engine.tiny import make_tiny
    return make_tiny(str(tmp_path_factory.mktemp("tiny") / "weights"))


@pytest.fixture(scope="session")
def tiny_inpaint(tmp_path_factory):
    """The tiny weights with a 9-channel inpainting model (latents + mask + masked-image latents)."""
    from ipadapter_instruct.engine.tiny import make_tiny
    return make_tiny(str(tmp_path_factory.mktemp("tiny_inpaint") / "weights"), inpaint=True)


@pytest.fixture(scope="session")
def tiny_edit(tmp_path_factory):
    """The tiny weights of an InstructPix2Pix model (8 UNet input channels: latents + the photo's latent)."""
    from ipadapter_instruct.engine.tiny import make_tiny
    return make_tiny(str(tmp_path_factory.mktemp("tiny_edit") / "weights"), edit=True)


@pytest.fixture(scope="session")
def plus_dir(tiny, tmp_path_factory):
    """An IP-Adapter+ checkpoint for the tiny UNet, as plus.safetensors and (same tensors) plus.bin."""
    from diffusers import UNet2DConditionModel

    from ipadapter_instruct.engine.adapter import read_adapter_file
    from ipadapter_instruct.engine.tiny import tiny_adapter

    folder = tmp_path_factory.mktemp("plus")
    unet = UNet2DConditionModel.from_pretrained(tiny["model"], subfolder="unet")
    torch.manual_seed(1)
    tiny_adapter(str(folder / "plus.safetensors"), unet, kind="plus")
    image_proj, ip_adapter = read_adapter_file(folder / "plus.safetensors")
    torch.save({"image_proj": image_proj, "ip_adapter": ip_adapter}, folder / "plus.bin")
    return folder


def fly(pipe, requests: list[dict], joins: dict, leave: dict | None = None) -> dict:
    """Step-level batching on a schedule: joins maps a loop turn to the indices of `requests` (keyword arguments of
    pipe.start) admitted then; leave maps an index to the turn it is dropped before. Each turn steps every running
    flight once and finishes those done. -> {index: output} of those that finished."""
    running, out, it = {}, {}, 0
    leave = leave or {}
    while it in joins or running or any(k > it for k in joins):
        for i in joins.get(it, ()):
            running[i] = pipe.start(**requests[i])
        for i in [i for i in running if leave.get(i) == it]:
            del running[i]
        if running:
            pipe.step(list(running.values()))
        for i in [i for i, f in running.items() if f.done]:
            out[i] = pipe.finish(running.pop(i))
        it += 1
    return out


def load_pipe(tiny, adapter):
    from ipadapter_instruct.engine import Pipeline
    pipe = Pipeline.from_pretrained(tiny["model"], image_encoder=tiny["image_encoder"], adapter=adapter, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def instruct_pipe(tiny):
    return load_pipe(tiny, tiny["adapter"])


@pytest.fixture(scope="session")
def plus_pipe(tiny, plus_dir):
    return load_pipe(tiny, plus_dir / "plus.safetensors")


@pytest.fixture(scope="session")
def cond_image():
    from ipadapter_instruct.engine.demo import draw_condition_image
    return draw_condition_image(64)


@pytest.fixture(scope="session")
def other_image():
    from PIL import Image
    g = torch.Generator().manual_seed(5)
    return Image.fromarray((torch.rand(40, 56, 3, generator=g) * 255).to(torch.uint8).numpy())


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one, selected with -m gpu")
    # diffusers' schedulers trip numpy 2's copy-keyword deprecation; not ours to fix, and it buries real warnings
    config.addinivalue_line("filterwarnings", "ignore:__array__ implementation doesn't accept a copy keyword")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.skip(reason=GPU_SKIP))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # ENGINE_GPU_CHECK=1 (bench/gpu_session.sh on a GPU machine): a gpu-marked test that skips there, for want of
    # a package, a compiler or a GPU, is a failure of the check, not a pass
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("ENGINE_GPU_CHECK") == "1" and item.get_closest_marker("gpu"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in the GPU check (ENGINE_GPU_CHECK=1), which counts as a failure: {reason}"
