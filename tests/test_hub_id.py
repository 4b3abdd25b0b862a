"""`Pipeline.from_pretrained("org/name")` loads a model by its hub id from the Hugging Face cache, offline.

The tiny weights are laid out as `huggingface_hub` keeps a download (models--ORG--NAME/snapshots/<hash>/..., refs/main
naming the hash; blobs left out: a snapshot's files may be plain files), and a fresh process with HF_HUB_OFFLINE=1
and HF_HUB_CACHE pointing there loads the id and generates. Nothing is downloaded."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REVISION = "0123456789abcdef0123456789abcdef01234567"

SCRIPT = """
import sys
from ipadapter_instruct import EngineError, Pipeline
try:
    Pipeline.from_pretrained("tiny-org/absent", device="cpu")
except EngineError as e:
    print("absent:", e)
pipe = Pipeline.from_pretrained("tiny-org/tiny-sd", image_encoder=sys.argv[1], adapter=sys.argv[2], device="cpu")
pipe.set_progress_bar_config(disable=True)
images = pipe(prompt="a lighthouse", image=sys.argv[3], instruct="use the style of this image",
              num_inference_steps=2, seed=0)
print("generated", len(images), images[0].size)
"""


def hub_cache(root: Path, repo_id: str, folder: str) -> Path:
    """A hub-cache entry for repo_id whose main revision is a copy of `folder`."""
    entry = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, entry / "snapshots" / REVISION)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(REVISION)
    return entry


def test_a_hub_id_loads_from_the_cache_offline_and_an_absent_one_is_one_line(tiny, tmp_path, cond_image):
    cache = tmp_path / "hf" / "hub"
    hub_cache(cache, "tiny-org/tiny-sd", tiny["model"])
    cond_image.save(tmp_path / "cond.png")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", SCRIPT, tiny["image_encoder"], tiny["adapter"],
                          str(tmp_path / "cond.png")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    absent, generated = run.stdout.splitlines()
    assert absent.startswith("absent: ") and "tiny-org/absent" in absent, absent  # one line naming the id
    assert generated == "generated 1 (64, 64)", run.stdout
