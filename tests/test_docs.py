"""Every example in README.md and docs/ runs as written, on tiny random weights; the synopses name every flag.

Each ```python block runs (placeholders such as path/to/stable-diffusion-v1-5 swapped for tiny weights, every
num_inference_steps made 2) unless its first line is `# not run by tests: REASON`; those are listed in NOT_RUN, so a
block cannot stop running unnoticed. The shell lines of docs/cli.md's "Try it on tiny weights" run as written."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN_MARK = "# not run by tests: "
# (page, the reason's start): what is not run here and where it is run instead
NOT_RUN = {("README.md", "needs a running server (tests/test_server_process.py"),
           ("README.md", "needs a CUDA GPU (tests/test_api_names.py"),
           ("docs/server.md", "needs a running server (tests/test_server_process.py")}
# blocks another test runs: (page, a line of the block) -> that test
ELSEWHERE = {("README.md", "from huggingface_hub import hf_hub_download, snapshot_download"): "tests/test_hub_id.py",
             ("docs/server.md", "from openai import OpenAI"): "tests/test_server_openai.py",
             ("docs/server.md", "api = webuiapi.WebUIApi("): "tests/test_server_a1111.py"}
IMAGES = ("cond.png", "photo.png", "ref.png", "a.png", "b.png", "style.png", "face.png", "edges.png", "mask.png")


def python_blocks():
    """-> [(page relative to the root, index on the page, code)] of every ```python block."""
    out = []
    for page in PAGES:
        text = page.read_text()
        assert not re.search(r"^[ \t]+```python", text, re.M), f"{page}: an indented ```python block (unindent it)"
        for i, code in enumerate(re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)):
            out.append((str(page.relative_to(ROOT)), i, code))
    return out


def elsewhere(page, code):
    return next((test for (p, line), test in ELSEWHERE.items() if p == page and line in code), None)


BLOCKS = python_blocks()
RUN = [b for b in BLOCKS if not b[2].startswith(NOT_RUN_MARK) and not elsewhere(b[0], b[2])]


def test_every_block_not_run_here_says_why_and_is_listed():
    skipped = {(page, code.splitlines()[0][len(NOT_RUN_MARK):]) for page, _, code in BLOCKS
               if code.startswith(NOT_RUN_MARK)}
    assert all(reason.strip() for _, reason in skipped), skipped
    listed = {(page, next((r for p, r in NOT_RUN if p == page and reason.startswith(r)), reason))
              for page, reason in skipped}
    assert listed == NOT_RUN, f"blocks not run: {sorted(skipped)}; NOT_RUN lists {sorted(NOT_RUN)}"
    for (page, line), test in ELSEWHERE.items():
        assert any(p == page and line in code for p, _, code in BLOCKS), f"{page} lost the block {test} runs"
        assert line in (ROOT / test).read_text() or page in (ROOT / test).read_text(), test
    assert len(RUN) >= 7, [(p, i) for p, i, _ in RUN]


@pytest.fixture(scope="module")
def weights(tiny, plus_dir, tmp_path_factory):
    """Placeholder -> tiny path, built on first use: the edit set, a ControlNet and a LoRA only when a block asks
    (the parts `make-tiny` writes as DIR/controlnet and DIR/lora.safetensors, engine/tiny_parts.py)."""
    from diffusers import UNet2DConditionModel

    from ipadapter_instruct.engine.tiny import make_tiny
    from ipadapter_instruct.engine.tiny_parts import tiny_controlnet, tiny_lora

    root = tmp_path_factory.mktemp("docs-weights")
    lazy = {"path/to/instruct-pix2pix": lambda: make_tiny(str(root / "edit"), edit=True),
            "path/to/stable-diffusion-inpainting": lambda: make_tiny(str(root / "inpaint"), inpaint=True)["model"],
            "path/to/controlnet": lambda: tiny_controlnet(
                root / "controlnet", UNet2DConditionModel.from_pretrained(tiny["model"], subfolder="unet")),
            "path/to/lora.safetensors": lambda: tiny_lora(str(root / "lora.safetensors"), tiny["model"])}
    built = {}

    def swaps(code: str) -> dict:
        for name, build in lazy.items():
            if name in code and name not in built:
                built[name] = build()
        edit = built.get("path/to/instruct-pix2pix")
        base = edit if edit and "path/to/instruct-pix2pix" in code else tiny  # an edit block's encoder and adapter
        out = {"path/to/stable-diffusion-v1-5": tiny["model"], "path/to/clip-vit-h-14": base["image_encoder"],
               "path/to/ip-adapter-instruct-sd15.bin": base["adapter"],
               "path/to/ip-adapter-plus_sd15.safetensors": plus_dir / "plus.safetensors"}
        if edit:
            out["path/to/instruct-pix2pix"] = edit["model"]
        for name in ("path/to/controlnet", "path/to/lora.safetensors", "path/to/stable-diffusion-inpainting"):
            if name in built:
                out[name] = built[name]
        return out
    return swaps


@pytest.mark.parametrize("page,index,code", RUN, ids=[f"{p}#{i}" for p, i, _ in RUN])
def test_python_block_runs(page, index, code, weights, tmp_path, cond_image, monkeypatch):
    for placeholder, real in weights(code).items():
        code = code.replace(f'"{placeholder}"', repr(str(real)))
    assert "path/to/" not in code, f"{page} block {index}: a placeholder this test does not know"
    code = re.sub(r"num_inference_steps=\d+", "num_inference_steps=2", code)
    monkeypatch.chdir(tmp_path)
    for name in IMAGES:
        cond_image.save(name)
    scope = {}
    exec(compile(code, f"{ROOT / page} (block {index})", "exec"), scope)
    for name in re.findall(r'\.save\("([^"]+)"\)', code):
        assert os.path.isfile(name), f"{page} block {index} did not write {name}"
    if "pipe" in scope and hasattr(scope["pipe"], "timings"):
        assert scope["pipe"].timings, f"{page} block {index}: no timings"


def shell_lines(page: Path, heading: str) -> list[str]:
    section = page.read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```sh\n(.*?)```", section, re.S)[0]
    return [line.split("  #")[0].strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_cli_page_commands_run_on_tiny_weights(tiny, tmp_path, cond_image):
    lines = shell_lines(ROOT / "docs" / "cli.md", "Try it on tiny weights")
    assert lines[0].startswith("python -m engine make-tiny "), lines[0]
    cond_image.save(tmp_path / "cond.png")
    mask = Image.new("L", cond_image.size, 0)  # the inpainting line's: its centre repainted
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for line in lines:
        argv = shlex.split(line)
        assert argv[:3] == ["python", "-m", "engine"], line
        if argv[3] == "make-tiny":
            run = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                                 timeout=300)
            assert run.returncode == 0, f"{line}\n{run.stderr[-2000:]}"
            continue
        steps = [i for i, arg in enumerate(argv) if arg in ("--num-inference-steps", "--steps")]
        assert len(steps) == 1 and argv[steps[0] + 1] == "2", f"keep the docs' tiny examples at 2 steps: {line}"
        run = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, f"{line}\n{run.stderr[-2000:]}"
    for name in ("styled.png", "text-0.png", "text-1.png", "parts.png", "redrawn.png", "inpainted.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size == (64, 64), name


def fenced(page: str, heading: str | None = None) -> str:
    """The first bare ``` block of a page (under `## heading` when given)."""
    text = (ROOT / page).read_text()
    if heading:
        text = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```\n(.*?)^```", text, re.S | re.M)
    assert blocks, f"no ``` block in {page}"
    return blocks[0]


def long_flags(parser_name: str) -> set[str]:
    from ipadapter_instruct.engine.__main__ import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices[parser_name]
    return {s for a in sub._actions for s in a.option_strings if s.startswith("--")} - {"--help"}


def test_cli_synopsis_names_every_generate_flag():
    flags = long_flags("generate")
    synopsis = fenced("docs/cli.md").split("python -m engine make-tiny")[0]
    named = set(re.findall(r"--[a-z][a-z-]*", synopsis))
    assert named == flags, f"docs/cli.md lacks {sorted(flags - named)}, names unknown {sorted(named - flags)}"


def test_server_synopsis_names_every_serve_flag_and_every_server_config_field_is_a_flag():
    from dataclasses import fields

    from ipadapter_instruct.engine.__main__ import build_parser
    from ipadapter_instruct.engine.server.config import ServerConfig

    flags = long_flags("serve")
    named = set(re.findall(r"--[a-z][a-z-]*", fenced("docs/server.md")))
    assert named == flags, f"docs/server.md lacks {sorted(flags - named)}, names unknown {sorted(named - flags)}"
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    dests = {a.dest for a in serve._actions}
    assert [f.name for f in fields(ServerConfig) if f.name not in dests] == [], "a ServerConfig field has no flag"


def test_docs_links_resolve():
    """Every relative link in README.md and docs/ names a file that exists (and, with #anchor, a heading in it)."""
    def anchors(path: Path) -> set[str]:
        heads = re.findall(r"^#+ (.+)$", path.read_text(), re.M)
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}

    bad = []
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
                bad.append(f"{page.relative_to(ROOT)}: {target}")
    assert bad == [], bad
