"""docs/server.md's curl lines for OpenAI's and Automatic1111's shapes run as written (through bash, for their
`$(base64 ...)`) against a server on the tiny weights, each answered 200 with images; the sizes and steps are
swapped for the tiny model's (64 px, 2 steps), the URL for the test server's. (The Python client blocks beside
them are run by tests/test_server_openai.py and tests/test_server_a1111.py.)"""
import base64
import io
import json
import os
import re
import subprocess

from PIL import Image
from server_utils import REPO, ServerProcess


def curl_lines(section: str) -> list[str]:
    text = open(os.path.join(REPO, "docs", "server.md"), encoding="utf-8").read()
    part = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```sh\n(.*?)```", part, re.S)[0]
    commands, current = [], ""
    for line in block.splitlines():  # a command runs on across lines ending in \\ or inside its open quote
        current += line + "\n"
        if not current.rstrip().endswith("\\") and current.count("'") % 2 == 0:
            commands.append(current.strip())
            current = ""
    return [c for c in commands if c.startswith("curl")]


def tiny_sizes(command: str, url: str) -> str:
    command = command.replace("http://127.0.0.1:8000", url).replace("curl -s ", "curl -sf ")
    command = re.sub(r"512x512", "64x64", command)
    command = re.sub(r'"(width|height)": 512', r'"\1": 64', command)
    return re.sub(r'"(steps|num_inference_steps)": 30', r'"\1": 2', command)


def test_the_openai_and_automatic1111_curl_lines_run(tiny, cond_image, tmp_path):
    folder = os.path.dirname(tiny["model"])
    photo = cond_image.resize((64, 64)).transpose(Image.Transpose.ROTATE_90)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    for name, im in (("cond.png", cond_image), ("photo.png", photo), ("mask.png", mask)):
        im.save(tmp_path / name)
    serve = ["--model", f"{folder}/model", "--image-encoder", f"{folder}/image_encoder", "--adapter",
             f"{folder}/adapter.safetensors"]
    commands = {s: curl_lines(s) for s in ("OpenAI's images API", "Automatic1111's API (/sdapi/v1)")}
    assert len(commands["OpenAI's images API"]) == 2 and len(commands["Automatic1111's API (/sdapi/v1)"]) == 1
    with ServerProcess(serve) as srv:
        for section, lines in commands.items():
            for command in lines:
                run = subprocess.run(["bash", "-c", tiny_sizes(command, srv.url)], cwd=tmp_path,
                                     capture_output=True, text=True, timeout=300)
                assert run.returncode == 0, (section, command, run.stderr, srv.output()[-2000:])
                body = json.loads(run.stdout)
                pngs = [d["b64_json"] for d in body["data"]] if "data" in body else body["images"]
                assert pngs and all(Image.open(io.BytesIO(base64.b64decode(p))).size == (64, 64) for p in pngs)
        srv.terminate()
