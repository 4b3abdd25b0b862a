"""The distribution is one import package, `ipadapter_instruct`, that lives beside Hugging Face's `kernels` (which
transformers imports by that name on every model load) and anything else named `train` or `bench`.

The wheel is built from the tracked files (as a fresh clone has them), installed into a folder of its own and used
from elsewhere; the checkout is used from its root as `python -m engine` users do. Both generate on the tiny weights
with the venv's transformers (no upper pin: `make install` takes the newest) and HF's kernels installed.
"""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("engine", "kernels", "export", "train", "bench")

# generate one image, then say where every module of a part's name came from
GENERATE = """
import json, sys
from ipadapter_instruct import Pipeline
pipe = Pipeline.from_pretrained({model!r}, image_encoder={encoder!r}, adapter={adapter!r}, device="cpu")
pipe.set_progress_bar_config(disable=True)
images = pipe("a red house", image=pipe_image(), instruct="use the style", num_inference_steps=2, seed=1)
import ipadapter_instruct, transformers
names = {{k: getattr(m, "__file__", None) for k, m in sys.modules.items() if k.split(".")[0] in {parts!r}}}
print(json.dumps({{"size": list(images[0].size), "package": ipadapter_instruct.__file__, "modules": names,
                  "transformers": transformers.__version__}}))
"""
PIPE_IMAGE = "def pipe_image():\n    from PIL import Image\n    return Image.new('RGB', (64, 64), (200, 40, 40))\n"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The project's wheel, built from the tracked files only (a fresh clone's), without build isolation."""
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((ROOT / name).read_bytes())
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                        "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (path,) = out.glob("*.whl")
    return path


def test_the_wheel_holds_one_top_level_package_with_its_data_and_the_ipai_script(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"ipadapter_instruct"}, tops
    for part in PARTS:
        assert f"ipadapter_instruct/{part}/__init__.py" in names
    for data in ("ipadapter_instruct/engine/server/static/index.html", "ipadapter_instruct/engine/configs/sd15/unet/config.json",
                 "ipadapter_instruct/engine/configs/tokenizer/merges.txt", "ipadapter_instruct/train/instructions/style.txt",
                 "ipadapter_instruct/export/cpp/plugin.cpp"):
        assert data in names, data
    (entry,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "ipai = ipadapter_instruct.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def run_generate(tiny, cwd, env):
    code = PIPE_IMAGE + GENERATE.format(model=tiny["model"], encoder=tiny["image_encoder"], adapter=tiny["adapter"],
                                        parts=PARTS)
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def hf_kernels_file() -> str:
    from importlib.metadata import distribution

    dist = distribution("kernels")  # Hugging Face's, a dependency of transformers >= 5.25 (and in the dev extra)
    return str(dist.locate_file("kernels/__init__.py"))


def test_the_installed_wheel_generates_from_elsewhere_beside_hf_kernels(wheel, tiny, tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info")) == ["bin", "ipadapter_instruct"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    seen = run_generate(tiny, elsewhere, env)
    assert seen["size"] == [64, 64]
    assert seen["package"] == str(target / "ipadapter_instruct" / "__init__.py")
    # transformers imported `kernels` while loading the image encoder: Hugging Face's, never ours
    assert seen["modules"].get("kernels") == hf_kernels_file(), seen["modules"]
    assert not [k for k in seen["modules"] if k != "kernels" and not k.startswith("kernels.")], seen["modules"]


def test_the_checkout_generates_from_its_root_and_hands_the_kernels_name_to_hf(tiny):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    seen = run_generate(tiny, ROOT, {**env, "HF_HUB_OFFLINE": "1"})
    assert seen["package"] == str(ROOT / "ipadapter_instruct" / "__init__.py")
    assert seen["modules"].get("kernels") == hf_kernels_file(), seen["modules"]
    # nothing of the checkout was loaded a second time under its folder's bare name
    assert not [k for k in seen["modules"] if k.split(".")[0] in ("engine", "export", "train", "bench")]


def test_python_m_engine_from_the_checkout_loads_each_module_once(tmp_path):
    """`python -m engine` runs the checkout's engine/ by its bare name: its code must import the package's modules
    (ipadapter_instruct.engine.*), not a second copy under `engine.*` (two EngineError classes, two registries)."""
    code = ("import runpy, sys\nsys.argv = ['engine', 'make-tiny', sys.argv[1]]\n"
            "try:\n    runpy.run_module('engine', run_name='__main__', alter_sys=True)\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('engine', 'export', 'train', 'bench')))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "w")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "['engine']", r.stdout


@pytest.mark.parametrize("argv", [["--help"], ["export", "--help"], ["generate", "--help"]])
def test_ipai_runs_every_part(argv):
    r = subprocess.run([sys.executable, "-m", "ipadapter_instruct", *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout
