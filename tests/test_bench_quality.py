"""`python -m bench quality` on a tiny random CLIPModel: the paper's CLIP-I/T/P/S against an independent
computation, hand-made cases, the long-format rows, per-task aggregation, errors, and engine generation."""
import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter_instruct.bench.quality import (METRICS, TABLE1, add_quality_args, clip_metrics, metrics_from_embeddings,
                           quality_main)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"op", "provider", "metric", "unit", "x_name", "x", "p20", "p50", "p80", "device", "dtype", "git_sha", "config"}


@pytest.fixture(scope="module")
def clip_dir(tiny):
    """The tiny random CLIPModel folder `make_tiny` writes (engine/tiny.py `tiny_clip`)."""
    return tiny["clip"]


def noise_image(seed: int, h: int = 40, w: int = 56) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


def make_items(n: int) -> list[dict]:
    tasks = ["replication", "style", "object", "pose"]
    return [{"index": i, "task": tasks[i % len(tasks)], "generated": noise_image(2 * i, 40 + i, 56 - i),
             "condition": noise_image(2 * i + 1), "caption": f"a photo of thing {i} on a table",
             "prompt": "a lighthouse at dusk" if i % 2 else "best quality, high quality"} for i in range(n)]


def independent(clip_dir: str, items: list[dict]) -> dict[str, list[float]]:
    """The metrics from the model's towers and projections directly, each text tokenised alone, in float64."""
    from transformers import AutoTokenizer, CLIPModel

    from ipadapter_instruct.engine.loading import _image_processor_class

    model = CLIPModel.from_pretrained(clip_dir).eval()
    tok = AutoTokenizer.from_pretrained(clip_dir)
    proc = _image_processor_class().from_pretrained(clip_dir)

    def image(im):
        px = proc(images=[im], return_tensors="pt")["pixel_values"]
        return model.visual_projection(model.vision_model(pixel_values=px).pooler_output)[0].double()

    def text(s):
        ids = torch.tensor([tok(s)["input_ids"]])
        return model.text_projection(model.text_model(input_ids=ids).pooler_output)[0].double()

    def unit(v):
        return v / v.norm()

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    out = {m: [] for m in METRICS}
    with torch.no_grad():
        for it in items:
            g, c = unit(image(it["generated"])), unit(image(it["condition"]))
            p, k = unit(text(it["prompt"])), unit(text(it["caption"]))
            out["CLIP-I"].append(cos(g, c))
            out["CLIP-T"].append(2.5 * max(cos(g, k), 0.0))
            out["CLIP-P"].append(2.5 * max(cos(g, p), 0.0))
            out["CLIP-S"].append(float((g - p) @ (c - k)))
            out["CLIP-S-cos"].append(cos(g - p, c - k))
    return out


def test_metrics_match_an_independent_computation(clip_dir):
    items = make_items(5)
    want = independent(clip_dir, items)
    for batch_size in (2, 16):  # a partial last batch and texts padded to different lengths change nothing
        got = clip_metrics(clip_dir, items, batch_size=batch_size)
        assert [r["index"] for r in got] == list(range(5)) and [r["task"] for r in got] == [i["task"] for i in items]
        for m in METRICS:
            np.testing.assert_allclose([r[m] for r in got], want[m], atol=1e-5, rtol=0, err_msg=m)
    assert len({round(v, 6) for v in want["CLIP-I"]}) == 5  # the random model does tell the images apart
    assert min(want["CLIP-T"] + want["CLIP-P"]) > 0.1  # CLIPScore's clamp is checked on hand-made embeddings


def test_identical_images_give_clip_i_of_one(clip_dir):
    im = noise_image(7)
    same = {"task": "replication", "generated": im, "condition": im.copy(), "caption": "a cat", "prompt": "a cat"}
    other = dict(same, generated=noise_image(8))
    r_same, r_other = clip_metrics(clip_dir, [same, other], batch_size=1)
    assert (r_same["index"], r_other["index"]) == (0, 1)  # items without an index are numbered in order
    assert abs(r_same["CLIP-I"] - 1) < 1e-5 and abs(r_same["CLIP-S-cos"] - 1) < 1e-5
    assert abs(r_same["CLIP-T"] - r_same["CLIP-P"]) < 1e-6
    assert r_other["CLIP-I"] < 1 - 1e-4


def test_clip_s_and_clipscore_on_hand_made_embeddings():
    # row 0: g=(.6,.8,0) c=(0,0,1) p=(0,1,0) k=(1,0,0); row 1: g=c=(-1,0,0), p=(0,1,0), k=(1,0,0)
    g = torch.tensor([[3.0, 4.0, 0.0], [-1.0, 0.0, 0.0]])
    c = torch.tensor([[0.0, 0.0, 2.0], [-1.0, 0.0, 0.0]])
    p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    k = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    want = {"CLIP-I": [0.0, 1.0], "CLIP-T": [2.5 * 0.6, 0.0], "CLIP-P": [2.5 * 0.8, 0.0],
            # (g-p).(c-k): (.6,-.2,0).(-1,0,1) = -.6 ; (-1,-1,0).(-2,0,0) = 2
            "CLIP-S": [-0.6, 2.0],
            "CLIP-S-cos": [-0.6 / (math.sqrt(0.4) * math.sqrt(2)), 2 / (math.sqrt(2) * 2)]}
    for factor in (1.0, 5.0):  # each embedding is normalised before the difference
        got = metrics_from_embeddings(g * factor, c * factor, p * factor, k * factor)
        for m, values in want.items():
            np.testing.assert_allclose(got[m].tolist(), values, atol=1e-6, err_msg=m)


def parse(*argv) -> argparse.Namespace:
    # on the CPU unless a test says otherwise: results are compared with CPU-computed metrics at 1e-6, and a GPU
    # scorer (TF32 convolutions) differs by ~5e-5
    parser = argparse.ArgumentParser()
    add_quality_args(parser)
    argv = [str(a) for a in argv]
    return parser.parse_args(argv if "--device" in argv else [*argv, "--device", "cpu"])


def write_set(root, items, generated_field=False) -> tuple:
    """Condition images beside the manifest (relative paths), generated images as gen/<index>.png."""
    (root / "cond").mkdir(parents=True, exist_ok=True)
    (root / "gen").mkdir(exist_ok=True)
    lines = []
    for it in items:
        it["condition"].save(root / "cond" / f"c{it['index']}.png")
        it["generated"].save(root / "gen" / f"{it['index']}.png")
        rec = {"condition": f"cond/c{it['index']}.png", "target": "t.png", "caption": it["caption"],
               "task": it["task"], "prompt": it["prompt"], "object": "dog"}  # extra keys are ignored
        if generated_field:
            rec["generated"] = f"gen/{it['index']}.png"
        lines.append(json.dumps(rec))
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n\n")
    return manifest, root / "gen"


def test_rows_aggregate_per_task_in_the_long_format(clip_dir, tmp_path, capsys):
    items = make_items(8)  # 2 records each of replication, style, object, pose
    manifest, gen = write_set(tmp_path, items)
    out = tmp_path / "q.json"
    assert quality_main(parse("--manifest", manifest, "--clip", clip_dir, "--generated", gen, "--json", out,
                              "--batch", 3)) == 0
    rows = json.loads(out.read_text())
    assert rows and all(set(r) == KEYS for r in rows)
    per_line = clip_metrics(clip_dir, [dict(it, generated=Image.open(gen / f"{it['index']}.png").convert("RGB"))
                                       for it in items])
    seen = {}
    for r in rows:
        assert (r["op"], r["provider"], r["x_name"], r["dtype"]) == ("quality", "generated", "task", "float32")
        assert r["unit"] == {"CLIP-I": "cosine", "CLIP-T": "clipscore", "CLIP-P": "clipscore", "CLIP-S": "dot",
                             "CLIP-S-cos": "cosine"}[r["metric"]]
        values = [p[r["metric"]] for p in per_line if p["task"] == r["x"]]
        assert r["config"]["count"] == len(values) == 2
        assert r["config"]["mean"] == pytest.approx(np.mean(values), abs=1e-6)
        assert [r["p20"], r["p50"], r["p80"]] == pytest.approx(np.percentile(values, [20, 50, 80]).tolist(), abs=1e-6)
        assert r["p20"] <= r["p50"] <= r["p80"]
        seen.setdefault(r["x"], []).append(r["metric"])
    assert seen == {"replication": list(TABLE1["replication"]), "style": list(TABLE1["style"]),
                    "object": list(TABLE1["object"]), "pose": list(METRICS)}
    table = capsys.readouterr().out
    labels = [line.split()[0] for line in table.splitlines()[4:] if line.strip()]
    assert labels[:8] == ["replication", "(paper)", "style", "(paper)", "object", "(paper)", "pose", str(len(rows))]
    assert "0.9098" in table and "1.1171" in table

    # the same images named by each record's `generated` field score the same
    manifest2, _ = write_set(tmp_path / "b", items, generated_field=True)
    out2 = tmp_path / "q2.json"
    assert quality_main(parse("--manifest", manifest2, "--clip", clip_dir, "--json", out2)) == 0
    rows2 = json.loads(out2.read_text())
    assert [(r["x"], r["metric"]) for r in rows2] == [(r["x"], r["metric"]) for r in rows]
    assert [r["p50"] for r in rows2] == pytest.approx([r["p50"] for r in rows], abs=1e-6)


def test_bad_paths_give_one_line_errors(clip_dir, tmp_path, capsys):
    items = make_items(4)
    items[3]["task"] = "lighting"  # a task with no default instruction
    manifest, gen = write_set(tmp_path, items)
    (gen / "1.png").unlink()
    vision = tmp_path / "vision"
    vision.mkdir()
    (vision / "config.json").write_text('{"model_type": "clip_vision_model"}')
    cases = [(("--manifest", tmp_path / "nope.jsonl", "--clip", clip_dir, "--generated", gen), "nope.jsonl"),
             (("--manifest", manifest, "--clip", tmp_path / "noclip", "--generated", gen), "noclip"),
             (("--manifest", manifest, "--clip", vision, "--generated", gen), "not a CLIPModel"),
             (("--manifest", manifest, "--clip", clip_dir, "--generated", tmp_path / "nogen"), "nogen"),
             (("--manifest", manifest, "--clip", clip_dir, "--generated", gen), str(gen / "1.png")),
             (("--manifest", manifest, "--clip", clip_dir), "no `generated` field"),
             (("--manifest", manifest, "--clip", clip_dir, "--model", "m", "--image-encoder", "e", "--adapter", "a"),
              "task 'lighting' and no `instruction`"),
             (("--manifest", manifest, "--clip", clip_dir, "--model", "m"), "give all of --model")]
    for argv, needle in cases:
        assert quality_main(parse(*argv, "--json", tmp_path / "x.json")) == 2, needle
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("python -m bench quality: error: ") and needle in err, err
    (tmp_path / "cond" / "c0.png").unlink()
    assert quality_main(parse("--manifest", manifest, "--clip", clip_dir, "--generated", gen,
                              "--json", tmp_path / "x.json")) == 2
    assert capsys.readouterr().err.endswith(f"record 0 not found: {tmp_path / 'cond' / 'c0.png'}\n")
    (tmp_path / "bad.jsonl").write_text('{"condition": "c.png", "task": "style"}\n')
    assert quality_main(parse("--manifest", tmp_path / "bad.jsonl", "--clip", clip_dir, "--json", tmp_path / "x")) == 2
    err = capsys.readouterr().err
    assert "line 1 lacks caption" in err and err.count("\n") == 1
    assert not (tmp_path / "x.json").exists()


def test_engine_generates_scores_and_saves_what_it_scored(clip_dir, tiny, tmp_path, capsys):
    items = make_items(3)
    items[2]["task"] = "composition"
    manifest, _ = write_set(tmp_path, items)
    lines = manifest.read_text().splitlines()
    lines[1] = json.dumps(dict(json.loads(lines[1]), instruction="take the style of this picture"))
    manifest.write_text("\n".join(lines) + "\n")
    out, images = tmp_path / "e.json", tmp_path / "made"
    assert quality_main(parse("--manifest", manifest, "--clip", clip_dir, "--model", tiny["model"],
                              "--image-encoder", tiny["image_encoder"], "--adapter", tiny["adapter"],
                              "--steps", 2, "--batch", 3, "--device", "cpu", "--out", images, "--json", out)) == 0
    rows = json.loads(out.read_text())
    assert {r["provider"] for r in rows} == {"engine"} and {r["x"] for r in rows} == {"replication", "style",
                                                                                       "composition"}
    assert all(set(r) == KEYS and r["config"]["steps"] == 2 for r in rows)
    assert sorted(p.name for p in images.iterdir()) == ["0.png", "1.png", "2.png"]
    # scoring the saved images gives the same numbers: what was scored is what was saved
    out2 = tmp_path / "g.json"
    assert quality_main(parse("--manifest", manifest, "--clip", clip_dir, "--generated", images, "--json", out2)) == 0
    again = {(r["x"], r["metric"]): r["config"]["mean"] for r in json.loads(out2.read_text())}
    for r in rows:
        assert r["config"]["mean"] == pytest.approx(again[(r["x"], r["metric"])], abs=1e-6)


def bench_cli(cwd, *argv):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "bench", "quality", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_the_readme_commands_run_on_make_tiny_weights(tiny, tmp_path):
    # docs/training.md, Quality: both forms, as written (no --json, --steps or --device), on `make-tiny`'s folders
    # and a held-out manifest in the trainer's format (target and object are not needed here)
    for i, task in enumerate(["everything", "style"]):
        noise_image(20 + i).save(tmp_path / f"c{i}.png")
        noise_image(30 + i).save(tmp_path / f"t{i}.png")
    records = [{"condition": f"c{i}.png", "target": f"t{i}.png", "caption": f"thing {i}", "task": task}
               for i, task in enumerate(["everything", "style"])]
    (tmp_path / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    engine = bench_cli(tmp_path, "--manifest", "held_out.jsonl", "--clip", tiny["clip"], "--model", tiny["model"],
                       "--image-encoder", tiny["image_encoder"], "--adapter", tiny["adapter"])
    assert engine.returncode == 0, engine.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "bench-quality.json").read_text())
    assert {(r["x"], r["metric"]) for r in rows} == {("everything", m) for m in TABLE1["replication"]} | {
        ("style", m) for m in TABLE1["style"]}
    assert {r["provider"] for r in rows} == {"engine"} and all(r["config"]["count"] == 1 for r in rows)
    assert all(math.isfinite(r["p50"]) for r in rows) and "records: 2" in engine.stdout

    (tmp_path / "generated").mkdir()
    for i in range(2):
        noise_image(40 + i).save(tmp_path / "generated" / f"{i}.png")
    scored = bench_cli(tmp_path, "--manifest", "held_out.jsonl", "--clip", tiny["clip"], "--generated", "generated")
    assert scored.returncode == 0, scored.stderr[-2000:]
    again = json.loads((tmp_path / "out" / "bench-quality.json").read_text())
    assert {r["provider"] for r in again} == {"generated"} and len(again) == len(rows)
