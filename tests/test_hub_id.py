"""Models load by hub id from the Hugging Face cache, offline: README.md's "Real weights" block runs as written.

The tiny weights are laid out as `huggingface_hub` keeps downloads (models--ORG--NAME/snapshots/<hash>/..., refs/main
naming the hash; a snapshot's files may be plain files): SD1.5's id holds the tiny model, h94/IP-Adapter the tiny
image encoder under models/image_encoder, CiaraRowles/IP-Adapter-Instruct the tiny adapter as
ip-adapter-instruct-sd15.bin. A fresh process with HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointing there runs the README's
block (hf_hub_download, snapshot_download, `Pipeline.from_pretrained(hub id)`) and generates. Nothing is downloaded."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
REVISION = "0123456789abcdef0123456789abcdef01234567"
ANCHOR = "from huggingface_hub import hf_hub_download, snapshot_download"

AFTER = """
import sys
from ipadapter_instruct import EngineError
try:
    Pipeline.from_pretrained("tiny-org/absent", device="cpu")
except EngineError as e:
    print("absent:", e)
pipe.set_progress_bar_config(disable=True)
images = pipe(prompt="a lighthouse", image=sys.argv[1], instruct="use the style of this image",
              num_inference_steps=2, seed=0)
print("generated", len(images), images[0].size)
"""


def readme_block() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    found = [b for b in blocks if ANCHOR in b]
    assert len(found) == 1, "README.md's Real weights block (hf_hub_download, snapshot_download) is gone"
    return found[0]


def snapshot(root: Path, repo_id: str) -> Path:
    """The folder of repo_id's main revision in a hub cache at root (made, with refs/main naming it)."""
    entry = root / f"models--{repo_id.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(REVISION)
    return entry / "snapshots" / REVISION


def test_the_readme_block_loads_hub_ids_from_the_cache_offline(tiny, tmp_path, cond_image):
    from ipadapter_instruct.engine.adapter import read_adapter_file

    cache = tmp_path / "hf" / "hub"
    shutil.copytree(tiny["model"], snapshot(cache, "stable-diffusion-v1-5/stable-diffusion-v1-5"))
    shutil.copytree(tiny["image_encoder"], snapshot(cache, "h94/IP-Adapter") / "models" / "image_encoder")
    instruct = snapshot(cache, "CiaraRowles/IP-Adapter-Instruct")
    instruct.mkdir(parents=True)
    image_proj, ip_adapter = read_adapter_file(tiny["adapter"])
    torch.save({"image_proj": image_proj, "ip_adapter": ip_adapter}, instruct / "ip-adapter-instruct-sd15.bin")
    cond_image.save(tmp_path / "cond.png")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    code = readme_block().replace('adapter=adapter)', 'adapter=adapter, device="cpu")') + AFTER
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cond.png")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    absent, generated = run.stdout.splitlines()[-2:]
    assert absent.startswith("absent: ") and "tiny-org/absent" in absent, absent  # one line naming the id
    assert generated == "generated 1 (64, 64)", run.stdout
