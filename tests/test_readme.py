"""The README's Python API block runs as written (on the tiny weights), and its CLI synopsis names every flag."""
import re
from pathlib import Path

from PIL import Image

README = Path(__file__).resolve().parent.parent / "README.md"


def section(title: str) -> str:
    text = README.read_text()
    head = f"\n## {title}\n"
    assert head in text, f"README.md has no section {title!r}"
    return text.split(head, 1)[1].split("\n## ", 1)[0]


def fenced(title: str, lang: str = "") -> str:
    blocks = re.findall(rf"```{lang}\n(.*?)```", section(title), re.S)
    assert len(blocks) >= 1, f"no ```{lang} block under ## {title}"
    return blocks[0]


def test_python_api_block_runs(tiny, tmp_path, cond_image, monkeypatch):
    code = fenced("Python API", "python")
    swaps = {"path/to/stable-diffusion-v1-5": tiny["model"], "path/to/clip-vit-h-14": tiny["image_encoder"],
             "path/to/ip-adapter-instruct-sd15.bin": tiny["adapter"], "num_inference_steps=30": "num_inference_steps=2"}
    for placeholder, real in swaps.items():
        assert placeholder in code, f"the README block no longer says {placeholder!r}: update this test"
        code = code.replace(placeholder, str(real))
    monkeypatch.chdir(tmp_path)
    cond_image.save("cond.png")
    scope = {}
    exec(compile(code, f"{README}: Python API", "exec"), scope)
    pipe = scope["pipe"]
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    for name in ("out.png", "text.png"):
        with Image.open(name) as im:
            assert im.size == (native, native), name
    assert pipe.timings["unet_ms_per_step"] > 0 and scope["text_only"].adapter is None


def test_cli_synopsis_names_every_generate_flag():
    from ipadapter_instruct.engine.__main__ import build_parser

    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    flags = {s for a in generate._actions for s in a.option_strings if s.startswith("--")} - {"--help"}
    synopsis = fenced("CLI").split("python -m engine make-tiny")[0]
    named = set(re.findall(r"--[a-z][a-z-]*", synopsis))
    assert named == flags, f"README lacks {sorted(flags - named)}, names unknown {sorted(named - flags)}"



def test_server_synopsis_names_every_serve_flag_and_every_server_config_field_is_a_flag():
    from dataclasses import fields

    from ipadapter_instruct.engine.__main__ import build_parser
    from ipadapter_instruct.engine.server.config import ServerConfig

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    flags = {s for a in serve._actions for s in a.option_strings if s.startswith("--")} - {"--help"}
    named = set(re.findall(r"--[a-z][a-z-]*", fenced("Server")))
    assert named == flags, f"README lacks {sorted(flags - named)}, names unknown {sorted(named - flags)}"
    dests = {a.dest for a in serve._actions}
    assert [f.name for f in fields(ServerConfig) if f.name not in dests] == [], "a ServerConfig field has no flag"
