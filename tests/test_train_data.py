"""The trainer's data side: instruction banks, the JSONL manifest, the dataset and the example builders."""
import json
import logging
import os
import random
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.loading import _image_processor_class
from ipadapter_instruct.train.data import (Example, TrainDataset, build_face_examples, build_object_examples, collate,
                        make_synthetic, read_manifest, replication_examples, write_manifest)
from ipadapter_instruct.train.instructions import BANKS_DIR, KEYWORDS, TASKS, load_banks, sample_instruction

CLIP_SIZE = 20


def has_word_start(text, word):
    return re.search(r"\b" + re.escape(word), text, re.IGNORECASE) is not None


@pytest.fixture(scope="module")
def banks():
    return load_banks()


@pytest.fixture(scope="module")
def processor():
    return _image_processor_class()(size={"shortest_edge": CLIP_SIZE},
                                    crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE})


def save(path, size=(40, 30), colour=(10, 200, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return str(path)


# ---- instruction banks ----

def test_shipped_banks_are_large_varied_and_single_task(banks):
    assert tuple(banks) == TASKS
    for task, phrasings in banks.items():
        assert len(phrasings) >= 40, task
        words = [len(p.split()) for p in phrasings]
        assert min(words) <= 3 and max(words) >= 8, (task, min(words), max(words))
        for other in set(TASKS) - {task}:
            bad = [p for p in phrasings for w in KEYWORDS[other] if has_word_start(p, w)]
            assert not bad, (task, other, bad)
        with open(os.path.join(BANKS_DIR, f"{task}.txt")) as fh:   # nothing shipped is silently dropped
            lines = [ln.strip() for ln in fh if ln.strip() and not ln.startswith("#")]
        assert phrasings == lines
    assert sum("object" in p.split() for p in banks["object"]) > len(banks["object"]) // 2


def test_cross_task_phrasings_are_dropped_and_extra_files_are_tasks(tmp_path):
    (tmp_path / "style.txt").write_text("# a comment naming composition\n\nuse the style\n"
                                        "keep the Composition and the style\nFaces in this style\n"
                                        "keep the surface texture\nthe colour style\nuse the style\n")
    (tmp_path / "composition.txt").write_text("keep the layout\n")
    (tmp_path / "colour.txt").write_text("use the colours\nthe colour of the object\n")
    (tmp_path / "notes.md").write_text("not a bank\n")
    banks = load_banks(str(tmp_path))
    assert banks == {"style": ["use the style", "keep the surface texture"], "composition": ["keep the layout"],
                     "colour": ["use the colours"]}


def test_a_keyword_two_tasks_share_does_not_drop_either(tmp_path):
    (tmp_path / "facial.txt").write_text("keep the facial expression\n")
    (tmp_path / "face.txt").write_text("same facial features\nthe face\n")
    assert load_banks(str(tmp_path)) == {"face": ["same facial features", "the face"],
                                         "facial": ["keep the facial expression"]}


def test_bank_errors_name_the_file(tmp_path):
    with pytest.raises(EngineError, match="does not exist"):
        load_banks(str(tmp_path / "missing"))
    with pytest.raises(EngineError, match="no <task>.txt"):
        load_banks(str(tmp_path))
    (tmp_path / "face.txt").write_text("# only a comment\nthe face and its style\n")
    with pytest.raises(EngineError, match=re.escape(str(tmp_path / "face.txt")) + " is empty"):
        load_banks(str(tmp_path))


def test_object_word_is_replaced_by_the_class_name():
    banks = {"object": ["put this object here", "Object: the object's handle", "objects, objective"]}
    want = {"put this red umbrella here", "red umbrella: the red umbrella's handle", "objects, objective"}
    rng = random.Random(0)
    got = {sample_instruction(banks, "object", rng, object_name="red umbrella") for _ in range(100)}
    assert got == want
    with pytest.raises(EngineError, match="object_name"):
        sample_instruction(banks, "object", rng)
    with pytest.raises(EngineError, match="unknown task 'pose'.*object"):
        sample_instruction(banks, "pose", rng)


def test_sampling_is_uniform_and_deterministic(banks):
    draw = [sample_instruction(banks, "style", random.Random(7)) for _ in range(3)]
    assert len(set(draw)) == 1
    a = [sample_instruction(banks, "face", r) for r in [random.Random(3)] for _ in range(50)]
    b = [sample_instruction(banks, "face", r) for r in [random.Random(3)] for _ in range(50)]
    c = [sample_instruction(banks, "face", r) for r in [random.Random(4)] for _ in range(50)]
    assert a == b and a != c
    small = {"style": ["a", "b", "c", "d"]}
    rng = random.Random(1)
    counts = {k: 0 for k in small["style"]}
    for _ in range(4000):
        counts[sample_instruction(small, "style", rng)] += 1
    assert all(900 < n < 1100 for n in counts.values()), counts


# ---- manifest ----

@pytest.fixture
def images(tmp_path):
    good = save(tmp_path / "img" / "good.png")
    bad = tmp_path / "img" / "bad.png"
    bad.write_bytes(b"not an image at all")
    Image.fromarray(np.arange(40 * 30 * 3, dtype=np.uint8).reshape(30, 40, 3)).save(tmp_path / "img" / "cut.png")
    whole = (tmp_path / "img" / "cut.png").read_bytes()
    (tmp_path / "img" / "cut.png").write_bytes(whole[:len(whole) // 2])   # a valid header, then nothing
    return {"good": good, "bad": str(bad), "cut": str(tmp_path / "img" / "cut.png"),
            "missing": str(tmp_path / "img" / "missing.png")}


def row(images, **over):
    base = {"condition": images["good"], "target": images["good"], "caption": "a cat", "task": "style"}
    return json.dumps({k: v for k, v in {**base, **over}.items() if v is not ...})


def bad_lines(images):
    """(manifest line, the problem read_manifest must report for it)."""
    keys = "condition, target, caption, task"
    try:
        json.loads("{not json")
    except json.JSONDecodeError as err:
        json_problem = f"not valid JSON ({err.msg} at column {err.colno})"
    return [
        ("{not json", json_problem),
        ("[1, 2]", f"expected a JSON object with keys {keys}, got list"),
        (row(images, caption=...), f"missing key 'caption' (an example needs {keys})"),
        (row(images, caption=3), "key 'caption' must be a string, got int"),
        (row(images, instuction="x"), f"unknown key 'instuction' (allowed: {keys}, object, instruction)"),
        (row(images, instruction=""), "key 'instruction' is empty: leave it out to sample one"),
        (row(images, task="pose"), f"unknown task 'pose' (known: {', '.join(TASKS)})"),
        (row(images, task="object"), "task 'object' needs an 'object' key naming the class"),
        (row(images, condition=images["missing"]), f"condition image {images['missing']} does not exist"),
        (row(images, target=images["bad"]),
         f"target image {images['bad']} cannot be opened as an image (UnidentifiedImageError)"),
        (row(images, condition=images["cut"]), f"condition image {images['cut']} cannot be opened as an image ("),
    ]


@pytest.mark.parametrize("case", range(11))
def test_manifest_problem_is_fatal_with_its_location(tmp_path, images, case):
    line, problem = bad_lines(images)[case]
    path = tmp_path / "m.jsonl"
    path.write_text(row(images) + "\n\n" + line + "\n" + row(images) + "\n")
    with pytest.raises(EngineError) as err:
        read_manifest(str(path), tasks=TASKS)
    if problem.endswith("("):   # a truncated file: the error type is PIL's
        assert str(err.value).startswith(f"{path}:3: {problem}") and "\n" not in str(err.value)
    else:
        assert str(err.value) == f"{path}:3: {problem}"


def test_manifest_skip_mode_warns_per_line_and_keeps_the_rest(tmp_path, images, caplog):
    cases = bad_lines(images)
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join([row(images, caption="first")] + [line for line, _ in cases]
                              + ["", row(images, task="object", object="cat", instruction="take the cat")]) + "\n")
    with caplog.at_level(logging.WARNING, logger="ipadapter_instruct.train.data"):
        examples = read_manifest(str(path), tasks=TASKS, on_error="skip")
    assert [(e.caption, e.task, e.object, e.instruction, e.line) for e in examples] == [
        ("first", "style", None, None, 1), ("a cat", "object", "cat", "take the cat", len(cases) + 3)]
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == len(cases)
    for number, ((_, problem), message) in enumerate(zip(cases, messages), start=2):
        assert message.startswith(f"{path}:{number}: {problem}")


def test_manifest_with_nothing_usable_or_bad_mode_is_an_error(tmp_path, images):
    path = tmp_path / "m.jsonl"
    path.write_text("{oops\n\n")
    with pytest.raises(EngineError, match="no usable example"):
        read_manifest(str(path), on_error="skip")
    with pytest.raises(EngineError, match="on_error must be"):
        read_manifest(str(path), on_error="ignore")
    with pytest.raises(EngineError, match="does not exist"):
        read_manifest(str(tmp_path / "nope.jsonl"))


def test_relative_paths_resolve_against_the_manifest_folder(tmp_path, monkeypatch):
    data = tmp_path / "data"
    save(data / "images" / "a.png")
    other = save(tmp_path / "elsewhere" / "b.png")
    (data / "m.jsonl").write_text(json.dumps({"condition": "images/a.png", "target": other, "caption": "",
                                              "task": "everything"}) + "\n")
    monkeypatch.chdir(tmp_path / "elsewhere")
    (ex,) = read_manifest(str(data / "m.jsonl"))
    assert ex.condition == str(data / "images" / "a.png") and ex.target == other


# ---- dataset ----

def striped(path, size):
    """Three vertical bands red | green | blue."""
    a = np.zeros((size[1], size[0], 3), np.uint8)
    for k in range(3):
        a[:, k * size[0] // 3:(k + 1) * size[0] // 3, k] = 255
    Image.fromarray(a).save(path)
    return str(path)


def test_dataset_items(tmp_path, banks, processor):
    target = striped(tmp_path / "t.png", (90, 30))
    cond = save(tmp_path / "c.png", (50, 70), (200, 100, 0))
    examples = [Example(cond, target, "wide bands", "style"),
                Example(cond, target, "fixed", "object", object="cat", instruction="take the cat please")]
    ds = TrainDataset(examples, banks, processor, resolution=12)
    item = ds[0]
    px = item["pixel_values"]
    assert px.shape == (3, 12, 12) and px.dtype == torch.float32
    assert px.min() >= -1 and px.max() <= 1
    # 90x30 -> 36x12, centre 12 columns = the green band
    assert torch.allclose(px[:, :, 4:8], torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 12, 4))
    want_clip = processor(images=Image.open(cond).convert("RGB"), return_tensors="pt").pixel_values[0]
    assert torch.equal(item["clip_pixels"], want_clip) and want_clip.shape == (3, CLIP_SIZE, CLIP_SIZE)
    assert item["caption"] == "wide bands" and item["task"] == "style" and item["instruction"] in banks["style"]
    assert ds[1]["instruction"] == ds[-1]["instruction"] == "take the cat please"
    batch = collate([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (2, 3, 12, 12) and batch["clip_pixels"].shape == (2, 3, CLIP_SIZE, CLIP_SIZE)
    assert batch["caption"] == ["wide bands", "fixed"] and batch["task"] == ["style", "object"]


def test_dataset_instruction_depends_only_on_seed_epoch_index(tmp_path, banks, processor):
    img = save(tmp_path / "a.png")
    examples = [Example(img, img, "c", "object", object="kite")] * 6

    def run(seed, epochs):
        ds = TrainDataset(examples, banks, processor, 8, seed=seed)
        out = []
        for e in epochs:
            ds.set_epoch(e)
            out.append([ds.instruction(i) for i in range(len(ds))])
        return out

    first = run(0, [0, 1, 2])
    assert run(0, [2, 1, 0]) == first[::-1]           # an epoch resumed alone gives the same texts
    assert run(0, [0, 1, 2]) == first and run(1, [0, 1, 2]) != first
    assert first[0] != first[1] and len(set(first[0])) > 1
    assert all("kite" in t or "object" not in t for ep in first for t in ep)
    ds = TrainDataset(examples, banks, processor, 8, seed=0)
    ds.set_epoch(1)
    assert [ds[i]["instruction"] for i in range(6)] == first[1]


def test_dataset_rejects_tasks_without_a_bank(tmp_path, banks, processor):
    img = save(tmp_path / "a.png")
    with pytest.raises(EngineError, match="'pose'.*no instruction bank"):
        TrainDataset([Example(img, img, "c", "pose")], banks, processor, 8)
    TrainDataset([Example(img, img, "c", "pose", instruction="copy the pose")], banks, processor, 8)


# ---- builders ----

def test_build_object_examples_crop_and_pad(tmp_path):
    scene = np.full((80, 100, 3), 30, np.uint8)
    scene[10:40, 20:60] = (250, 0, 0)            # the umbrella: box [20, 10, 40, 30]
    save(tmp_path / "coco" / "2.png", (64, 64))
    Image.fromarray(scene).save(tmp_path / "coco" / "1.png")
    coco = {"images": [{"id": 1, "file_name": "1.png"}, {"id": 2, "file_name": "2.png"}],
            "categories": [{"id": 5, "name": "umbrella"}, {"id": 6, "name": "apple"}],
            "annotations": [{"id": 11, "image_id": 1, "category_id": 5, "bbox": [20, 10, 40, 30]},
                            {"id": 12, "image_id": 1, "category_id": 6, "bbox": [0, 0, 10, 50]},
                            {"id": 13, "image_id": 2, "category_id": 6, "bbox": [0, 0, 40, 40], "iscrowd": 1},
                            {"id": 14, "image_id": 2, "category_id": 6, "bbox": [4, 4, 20, 24]}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    out = tmp_path / "out"
    exs = build_object_examples(str(tmp_path / "coco.json"), str(tmp_path / "coco"), str(out), random.Random(0),
                                min_size=16)
    assert [(e.task, e.object, e.caption) for e in exs] == [("object", "umbrella", "a photo of an umbrella"),
                                                           ("object", "apple", "a photo of an apple")]
    assert exs[0].target == str(tmp_path / "coco" / "1.png") and os.path.isabs(exs[0].condition)
    crop = np.asarray(Image.open(exs[0].condition))
    assert crop.shape == (40, 40, 3)
    assert (crop[5:35] == (250, 0, 0)).all()          # the box, centred
    pad = crop[:5].reshape(-1, 3)
    assert (pad == pad[0]).all() and (crop[35:].reshape(-1, 3) == pad[0]).all()
    assert Image.open(exs[1].condition).size == (24, 24)
    again = build_object_examples(str(tmp_path / "coco.json"), str(tmp_path / "coco"), str(tmp_path / "o2"),
                                  random.Random(0), min_size=16, caption_of=lambda i: f"image {i}")
    assert np.array_equal(np.asarray(Image.open(again[0].condition)), crop)
    assert [e.caption for e in again] == ["image 1", "image 2"]
    other = build_object_examples(str(tmp_path / "coco.json"), str(tmp_path / "coco"), str(tmp_path / "o3"),
                                  random.Random(1), min_size=16)
    assert not np.array_equal(np.asarray(Image.open(other[0].condition))[:5], crop[:5])


def test_build_face_examples_zooms_half_of_the_boxed(tmp_path):
    items = []
    for k in range(5):
        a = np.zeros((60, 80, 3), np.uint8)
        a[20:36, 30:46] = (255, 200, 150)             # the face: box [30, 20, 16, 16]
        path = tmp_path / "faces" / f"{k}.png"
        os.makedirs(path.parent, exist_ok=True)
        Image.fromarray(a).save(path)
        items.append((str(path), f"person {k}", [30, 20, 16, 16]) if k < 4 else (str(path), "no box"))
    exs = build_face_examples(items, str(tmp_path / "out"), random.Random(0))
    assert [e.task for e in exs] == ["face"] * 5 and [e.caption for e in exs] == [i[1] for i in items]
    assert all(e.target == i[0] for e, i in zip(exs, items))
    zoomed = [e for e in exs if e.condition != e.target]
    assert len(zoomed) == 2 and exs[4].condition == exs[4].target
    for e in zoomed:
        crop = np.asarray(Image.open(e.condition))
        assert crop.shape == (24, 24, 3)              # 1.5 x 16, centred on the face
        assert (crop[4:20, 4:20] == (255, 200, 150)).all() and (crop[:4] == 0).all()
    again = build_face_examples(items, str(tmp_path / "out2"), random.Random(0))
    assert [e.condition == e.target for e in again] == [e.condition == e.target for e in exs]


def test_replication_examples_and_manifest_round_trip(tmp_path):
    a, b = save(tmp_path / "data" / "a.png"), save(tmp_path / "b.png")
    exs = replication_examples([(a, "first"), (b, "second")])
    assert [(e.condition, e.target, e.task, e.caption) for e in exs] == [
        (a, a, "everything", "first"), (b, b, "everything", "second")]
    exs.append(Example(a, b, "x", "object", object="cup", instruction="the cup"))
    path = write_manifest(exs, str(tmp_path / "data" / "m.jsonl"))
    assert json.loads(open(path).readline())["condition"] == "a.png"
    assert [replace(e, line=0) for e in read_manifest(path)] == exs
    assert not [f for f in os.listdir(tmp_path / "data") if f.startswith(".manifest")]
    with pytest.raises(EngineError, match="does not exist"):
        replication_examples([(str(tmp_path / "gone.png"), "x")])


def test_make_synthetic_is_readable_covers_every_task_and_is_deterministic(tmp_path, banks, processor):
    path = make_synthetic(str(tmp_path / "a"), 11, seed=3, size=32)
    exs = read_manifest(path, tasks=TASKS)
    assert len(exs) == 11 and {e.task for e in exs} == set(TASKS)
    assert all(e.object in ("circle", "square", "triangle") for e in exs if e.task == "object")
    assert all((e.condition == e.target) == (e.task == "everything") for e in exs)
    assert len({e.caption for e in exs}) > 5
    ds = TrainDataset(exs, banks, processor, 16)
    assert all(ds[i]["pixel_values"].shape == (3, 16, 16) for i in range(len(ds)))
    same = make_synthetic(str(tmp_path / "b"), 11, seed=3, size=32)
    other = make_synthetic(str(tmp_path / "c"), 11, seed=4, size=32)

    def content(p):
        folder = os.path.dirname(p)
        return open(p).read(), {f: open(os.path.join(folder, "images", f), "rb").read()
                                for f in sorted(os.listdir(os.path.join(folder, "images")))}

    assert content(path) == content(same) and content(path) != content(other)
