"""Mistakes visible before loading (engine/preflight.py) are one line, raised before torch, diffusers, transformers or
triton is imported and before any weight file is opened: each command is run as `python -m engine ...` under a
probe that reports, at exit, the heavy modules imported and the weight files opened (an audit hook on `open`)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import PROMPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "diffusers", "transformers", "triton", "onnxruntime", "tensorrt")
WEIGHTS = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
PROBE = """
import atexit, json, runpy, sys
opened = []
def hook(event, args):
    if event == "open" and isinstance(args[0], str) and args[0].endswith(%r):
        opened.append(args[0])
sys.addaudithook(hook)
atexit.register(lambda: print("PROBE " + json.dumps({"heavy": sorted(m for m in %r if m in sys.modules),
                                                      "opened": opened}), file=sys.stderr))
module = sys.argv.pop(1)
sys.argv[0] = module
runpy.run_module(module, run_name="__main__", alter_sys=True)
""" % (WEIGHTS, HEAVY)


def probe(module: str, *args, env=None) -> tuple[int, list[str], dict, str]:
    """`python -m module args` from the repository root -> (exit code, stderr lines without the probe's, probe
    report, stdout)."""
    env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    r = subprocess.run([sys.executable, "-c", PROBE, module, *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    lines = r.stderr.splitlines()
    report = json.loads(next(ln for ln in lines if ln.startswith("PROBE "))[len("PROBE "):])
    return r.returncode, [ln for ln in lines if not ln.startswith("PROBE ")], report, r.stdout


def assert_light_one_line(result, match: str, allowed_opens=()):
    rc, lines, report, _ = result
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert match in lines[0], lines[0]
    assert report["heavy"] == [], f"imported {report['heavy']} before failing"
    assert set(report["opened"]) <= set(allowed_opens), report["opened"]


def config_copy(src: str, dst, **unet_changes) -> str:
    """The JSON configs (and tokenizer files) of a tiny model folder, without any weight file; unet_changes edit
    unet/config.json. Pre-flight reads nothing else, so no weights are needed to fail."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*(f"*{e}" for e in WEIGHTS)))
    path = os.path.join(dst, "unet", "config.json")
    with open(path) as fh:
        config = json.load(fh)
    with open(path, "w") as fh:
        json.dump({**config, **unet_changes}, fh)
    return str(dst)


@pytest.fixture(scope="module")
def folders(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    from PIL import Image
    Image.new("RGB", (32, 32), "red").save(root / "img.png")
    with open(os.path.join(tiny["model"], "unet", "config.json")) as fh:
        unet = json.load(fh)
    os.makedirs(root / "controlnet")
    with open(root / "controlnet" / "config.json", "w") as fh:  # diffusers' default embedding: 8x, the VAE's 4x
        json.dump({**unet, "_class_name": "ControlNetModel", "conditioning_embedding_out_channels": [16, 32, 96, 256]},
                  fh)
    return {"img": str(root / "img.png"), "out": str(root / "out.png"),
            "edit": config_copy(tiny["model"], root / "edit", in_channels=8),
            "sdxl": config_copy(tiny["model"], root / "sdxl", addition_embed_type="text_time"),
            "controlnet": str(root / "controlnet")}


def generate(f, *args):
    return ("engine", "generate", *args, "--prompt", "a house", "--out", f["out"], "--overwrite", "--steps", "1")


def test_missing_model_path(folders):
    assert_light_one_line(probe(*generate(folders, "--model", "nope")), "base model not found: nope")
    offline = probe(*generate(folders, "--model", "no-such-org/no-such-model"), env={"HF_HUB_OFFLINE": "1"})
    assert_light_one_line(offline, "HF_HUB_OFFLINE=1 with no copy of that hub id")


def test_a_part_of_the_model_names_the_folder_above(tiny, folders):
    unet = os.path.join(tiny["model"], "unet")
    assert_light_one_line(probe(*generate(folders, "--model", unet)),
                          f"is the unet/ part of a model: pass the folder above it, {tiny['model']}")


def test_absent_cuda_device(tiny, folders):
    # the light probe: CUDA_VISIBLE_DEVICES hiding every GPU is enough to know, whatever the machine
    result = probe(*generate(folders, "--model", tiny["model"], "--device", "cuda"), env={"CUDA_VISIBLE_DEVICES": ""})
    assert_light_one_line(result, "device cuda requested but no CUDA GPU is available")
    for command in (("demo", "--device", "cuda"), ("serve", "--tiny", "--device", "cuda")):
        assert_light_one_line(probe("engine", *command, env={"CUDA_VISIBLE_DEVICES": "-1"}), "no CUDA GPU")


@pytest.mark.parametrize("command, model, match", [
    ("generate", "edit", "is an InstructPix2Pix model"),
    ("edit", "model", "is a text-to-image SD1.5 model, not an InstructPix2Pix one"),
    ("edit", "sdxl", "is an SDXL model, not an InstructPix2Pix one"),
    ("serve --kind edit", "model", "not an InstructPix2Pix one"),
    ("serve --kind sdxl", "model", "not an SDXL folder"),
    ("serve --kind sd15", "edit", "is an InstructPix2Pix model"),
])
def test_wrong_model_kind(tiny, folders, command, model, match):
    path = tiny["model"] if model == "model" else folders[model]
    name, *rest = command.split()
    args = {"generate": generate(folders, "--model", path),
            "edit": ("engine", "edit", "--model", path, "--image", folders["img"], "--prompt", "x",
                     "--out", folders["out"], "--overwrite"),
            "serve": ("engine", "serve", "--model", path, *rest, "--port", "0")}[name]
    assert_light_one_line(probe(*args), match)


def test_instruct_adapter_without_an_instruction(tiny, folders):
    args = generate(folders, "--model", tiny["model"], "--image-encoder", tiny["image_encoder"], "--adapter",
                    tiny["adapter"], "--image", folders["img"])
    assert_light_one_line(probe(*args), "is IPAdapter-Instruct, which reads an instruction: give --instruct")


def test_adapter_kind_from_key_names_only(tiny, plus_dir, tmp_path):
    import torch

    from ipadapter_instruct.engine.adapter import read_adapter_file
    from ipadapter_instruct.engine.preflight import adapter_kind

    image_proj, ip_adapter = read_adapter_file(tiny["adapter"])
    torch.save({"image_proj": image_proj, "ip_adapter": ip_adapter}, tmp_path / "instruct.bin")
    torch.save({"image_proj": image_proj, "ip_adapter": ip_adapter}, tmp_path / "legacy.bin",
               _use_new_zipfile_serialization=False)
    assert adapter_kind(tiny["adapter"]) == adapter_kind(tmp_path / "instruct.bin") == "instruct"
    assert adapter_kind(plus_dir / "plus.safetensors") == adapter_kind(plus_dir / "plus.bin") == "plus|plain"
    assert adapter_kind(tmp_path / "legacy.bin") is None  # the old pickle format: left to the loader


def test_controlnet_that_does_not_fit(tiny, folders):
    args = generate(folders, "--model", tiny["model"], "--controlnet", folders["controlnet"], "--control-image",
                    folders["img"])
    assert_light_one_line(probe(*args), "does not fit this UNet: its conditioning embedding (4 blocks) shrinks "
                                        "the control image 8x but the latents are 4x smaller")


def test_load_pipeline_checks_before_importing_the_pipeline(tiny, folders):
    code = ("import sys\nfrom ipadapter_instruct.engine.errors import EngineError\n"
            "from ipadapter_instruct.engine.registry import EngineConfig, load_pipeline\n"
            f"try:\n    load_pipeline(EngineConfig(model={folders['edit']!r}, kind='sd15'))\n"
            "except EngineError as e:\n    print(e)\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.splitlines()[-2:] == [f"{folders['edit']} is an InstructPix2Pix model (its UNet reads the "
                                          "latents and the photo's latent): edit with EditPipeline / `python -m "
                                          "engine edit` (serve: --kind edit)", "[]"], r.stdout + r.stderr


def test_from_pretrained_checks_the_controlnet_before_loading(tiny, folders):
    from ipadapter_instruct.engine import EngineError, Pipeline
    with pytest.raises(EngineError, match="conditioning embedding"):
        Pipeline.from_pretrained(tiny["model"], device="cpu", controlnet=folders["controlnet"])


@pytest.mark.parametrize("module", ["export", "bench", "train"])
def test_help_imports_nothing_heavy(module):
    rc, _, report, out = probe(module, "--help")
    assert rc == 0 and "usage:" in out
    assert report["heavy"] == [], f"`python -m {module} --help` imported {report['heavy']}"


def test_a_good_run_still_generates(tiny, folders, tmp_path):
    rc, lines, report, out = probe("engine", "generate", "--model", tiny["model"], "--prompt", PROMPT, "--steps", "1",
                                   "--out", str(tmp_path / "a.png"), "--no-progress")
    assert rc == 0 and out.strip() == str(tmp_path / "a.png"), lines


def test_library_chatter_is_quiet_unless_verbose(tiny, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")}
    out = {}
    for flag in ("", "--verbose"):
        args = ["engine", "generate", "--model", tiny["model"], "--prompt", "a house", "--steps", "1", "--no-progress",
                "--overwrite",
                "--out", str(tmp_path / "a.png"), *([flag] if flag else [])]
        r = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env={**env, "PYTHONPATH": ROOT},
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        out[flag] = r.stderr
    assert "Loading weights" not in out[""] and "WARNING" not in out[""], out[""]
    assert "Loading weights" in out["--verbose"]


@pytest.mark.parametrize("module, argv", [("export", ["onnx", "--help"]), ("bench", ["e2e", "--help"]),
                                          ("train", ["--help"]), ("engine", ["serve", "--help"])])
def test_every_command_line_takes_verbose(module, argv):
    r = subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--verbose" in r.stdout


def test_bench_keeps_the_libraries_loud_under_verbose(monkeypatch):
    """bench's own loaders silence transformers and diffusers, except when --verbose asked for their output."""
    import transformers

    from ipadapter_instruct.bench.common import quiet_loaders
    from ipadapter_instruct.engine import verbosity
    from ipadapter_instruct.engine.verbosity import QUIET_ENV, VERBOSE_ENV, quiet_libraries

    for key in QUIET_ENV:  # --verbose drops these: the worker's later tests get them back
        monkeypatch.setenv(key, os.environ.get(key, QUIET_ENV[key]))
    monkeypatch.setattr(verbosity.logging, "basicConfig", lambda **kw: None)  # no root handler for later tests
    level = transformers.utils.logging.get_verbosity()
    try:
        monkeypatch.delenv(VERBOSE_ENV, raising=False)
        quiet_libraries(verbose=True)
        quiet_loaders()
        assert transformers.utils.logging.get_verbosity() == transformers.utils.logging.WARNING
        monkeypatch.delenv(VERBOSE_ENV)
        quiet_loaders()
        assert transformers.utils.logging.get_verbosity() == transformers.utils.logging.ERROR
    finally:
        transformers.utils.logging.set_verbosity(level)
