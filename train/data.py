"""Training examples: the JSONL manifest, the dataset the loop reads, and builders for local data.

A manifest line is one example:
  {"condition": "images/a.png", "target": "images/b.png", "caption": "a red house", "task": "style",
   "object": "house", "instruction": "fixed text"}
`object` is needed for the object task; `instruction` (optional) replaces sampling from the banks.
Relative image paths are relative to the manifest's folder.
"""
from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageDraw

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.loading import load_image

from ipadapter_instruct.train.instructions import TASKS, sample_instruction

log = logging.getLogger(__name__)

REQUIRED = ("condition", "target", "caption", "task")
OPTIONAL = ("object", "instruction")


@dataclass(frozen=True)
class Example:
    condition: str              # absolute path of the condition image (what the adapter sees)
    target: str                 # absolute path of the image the UNet learns to denoise
    caption: str                # the target's text prompt
    task: str
    object: str | None = None   # class name, for the object task
    instruction: str | None = None  # fixed instruction; None samples one from the task's bank
    line: int = 0               # manifest line it came from (0: built in memory)


def _image_problem(role: str, path: str) -> str | None:
    if not os.path.isfile(path):
        return f"{role} image {path} does not exist"
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as err:  # PIL raises many types for a bad file
        return f"{role} image {path} cannot be opened as an image ({type(err).__name__})"
    return None


def _parse(text: str, base: str, tasks) -> Example | str:
    """One manifest line -> an Example, or the problem with it (one line, no location)."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err.msg} at column {err.colno})"
    if not isinstance(row, dict):
        return f"expected a JSON object with keys {', '.join(REQUIRED)}, got {type(row).__name__}"
    for key in REQUIRED:
        if key not in row:
            return f"missing key {key!r} (an example needs {', '.join(REQUIRED)})"
    for key in row:
        if key not in REQUIRED + OPTIONAL:
            return f"unknown key {key!r} (allowed: {', '.join(REQUIRED + OPTIONAL)})"
        value = row[key]
        if not (isinstance(value, str) or (key in OPTIONAL and value is None)):
            return f"key {key!r} must be a string, got {type(value).__name__}"
        if key != "caption" and value is not None and not value.strip():
            return f"key {key!r} is empty" + (": leave it out to sample one" if key == "instruction" else "")
    if tasks is not None and row["task"] not in tasks:
        return f"unknown task {row['task']!r} (known: {', '.join(tasks)})"
    if row["task"] == "object" and not row.get("object"):
        return "task 'object' needs an 'object' key naming the class"
    paths = {role: os.path.normpath(os.path.join(base, row[role])) for role in ("condition", "target")}
    for role, path in paths.items():
        problem = _image_problem(role, path)
        if problem:
            return problem
    return Example(paths["condition"], paths["target"], row["caption"], row["task"], row.get("object"),
                   row.get("instruction"))


def read_manifest(path, tasks=None, on_error: str = "fatal") -> list[Example]:
    """JSONL manifest -> examples; a bad line is fatal (EngineError) or, with on_error="skip", logged and left out."""
    if on_error not in ("fatal", "skip"):
        raise EngineError(f"on_error must be 'fatal' or 'skip', got {on_error!r}")
    if not os.path.isfile(path):
        raise EngineError(f"manifest {path} does not exist")
    base = os.path.dirname(os.path.abspath(path))
    examples, skipped = [], 0
    with open(path, encoding="utf-8") as fh:
        for number, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            parsed = _parse(text, base, tasks)
            if isinstance(parsed, Example):
                examples.append(replace(parsed, line=number))
                continue
            message = f"{path}:{number}: {parsed}"
            if on_error == "fatal":
                raise EngineError(message)
            log.warning("%s (line skipped)", message)
            skipped += 1
    if not examples:
        raise EngineError(f"manifest {path} has no usable example ({skipped} bad lines skipped)")
    return examples


def write_manifest(examples, path) -> str:
    """Examples -> JSONL at `path`, written to a temporary file and renamed; images under its folder go relative."""
    path = os.path.abspath(path)
    base = os.path.dirname(path)
    os.makedirs(base, exist_ok=True)

    def rel(p: str) -> str:
        r = os.path.relpath(p, base)
        return p if r.startswith("..") else r

    fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=base)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for ex in examples:
                row = {"condition": rel(ex.condition), "target": rel(ex.target), "caption": ex.caption,
                       "task": ex.task}
                row.update({k: getattr(ex, k) for k in OPTIONAL if getattr(ex, k) is not None})
                fh.write(json.dumps(row) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def target_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """PIL image -> (3, resolution, resolution) in [-1, 1]: shorter side resized (bilinear), centre crop."""
    w, h = image.size
    if w <= h:
        size = (resolution, int(resolution * h / w))
    else:
        size = (int(resolution * w / h), resolution)
    image = image.resize(size, Image.BILINEAR)
    left, top = int(round((size[0] - resolution) / 2)), int(round((size[1] - resolution) / 2))
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return pixels / 127.5 - 1.0


class TrainDataset(torch.utils.data.Dataset):
    """Examples -> dicts of target pixels, CLIP pixels of the condition, caption, instruction and task.

    The instruction of item i in epoch e is drawn with random.Random(f"{seed}:{e}:{i}"): the same
    (seed, epoch, index) always gives the same text, in any worker and after a resume.
    """

    def __init__(self, examples, banks, image_processor, resolution: int, seed: int = 0):
        if resolution <= 0:
            raise EngineError(f"resolution must be a positive number of pixels, got {resolution}")
        if not examples:
            raise EngineError("TrainDataset needs at least one example")
        for ex in examples:
            if ex.instruction is None and ex.task not in banks:
                raise EngineError(f"example {ex.target} (line {ex.line}) has task {ex.task!r}, which has no "
                                  f"instruction bank (banks: {', '.join(banks)})")
        self.examples, self.banks, self.processor = list(examples), banks, image_processor
        self.resolution, self.seed, self.epoch = resolution, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples)

    def instruction(self, i: int) -> str:
        ex = self.examples[i]
        if ex.instruction is not None:
            return ex.instruction
        rng = random.Random(f"{self.seed}:{self.epoch}:{i}")
        return sample_instruction(self.banks, ex.task, rng, ex.object)

    def __getitem__(self, i: int) -> dict:
        # -> pixel_values (3, R, R) in [-1, 1]; clip_pixels (3, S, S) from the image processor; strings
        i = range(len(self.examples))[i]
        ex = self.examples[i]
        clip = self.processor(images=load_image(ex.condition), return_tensors="pt").pixel_values[0]
        pixels = target_tensor(load_image(ex.target, "target image"), self.resolution)
        return {"pixel_values": pixels, "clip_pixels": clip,
                "caption": ex.caption, "instruction": self.instruction(i), "task": ex.task}


def collate(batch: list[dict]) -> dict:
    """Items -> one batch: tensors stacked on a new first axis, strings kept as lists."""
    return {k: torch.stack([b[k] for b in batch]) if torch.is_tensor(batch[0][k]) else [b[k] for b in batch]
            for k in batch[0]}


def pad_square(image: Image.Image, colour) -> Image.Image:
    """Centre `image` on a square of its longer side filled with `colour`."""
    side = max(image.size)
    out = Image.new("RGB", (side, side), tuple(colour))
    out.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return out


def _random_colour(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randrange(256) for _ in range(3))


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def build_object_examples(coco_json, images_dir, out_dir, rng: random.Random, min_size=32,
                          caption_of=None) -> list[Example]:
    """COCO boxes -> object examples: each box (both sides >= min_size, crowds skipped) cropped and padded to a
    square with a random colour is the condition, the full image the target."""
    with open(coco_json, encoding="utf-8") as fh:
        coco = json.load(fh)
    names = {c["id"]: c["name"] for c in coco.get("categories", [])}
    files = {im["id"]: im["file_name"] for im in coco.get("images", [])}
    os.makedirs(os.path.join(out_dir, "objects"), exist_ok=True)
    examples, opened = [], {}
    for ann in coco.get("annotations", []):
        x, y, w, h = ann["bbox"]
        if ann.get("iscrowd") or w < min_size or h < min_size:
            continue
        if ann["image_id"] not in files or ann["category_id"] not in names:
            raise EngineError(f"{coco_json}: annotation {ann.get('id')} refers to image {ann['image_id']} or "
                              f"category {ann['category_id']}, which the file does not list")
        target = os.path.abspath(os.path.join(images_dir, files[ann["image_id"]]))
        if target not in opened:
            opened = {target: load_image(target, "target image")}   # annotations usually come grouped by image
        image = opened[target]
        box = (max(0, round(x)), max(0, round(y)), min(image.width, round(x + w)), min(image.height, round(y + h)))
        stem = f"{ann['image_id']}_{ann.get('id', len(examples))}"
        condition = os.path.abspath(os.path.join(out_dir, "objects", f"{stem}.png"))
        pad_square(image.crop(box), _random_colour(rng)).save(condition)
        name = names[ann["category_id"]]
        caption = (caption_of(ann["image_id"]) if caption_of else None) or f"a photo of {_article(name)} {name}"
        examples.append(Example(condition, target, caption, "object", object=name))
    return examples


def face_crop(image: Image.Image, box) -> Image.Image:
    """A square around face box [x, y, w, h]: side 1.5 x its longer side (at most the image's shorter side),
    centred on the face and shifted to lie inside the image."""
    x, y, w, h = box
    side = int(round(min(1.5 * max(w, h), *image.size)))
    left = int(round(min(max(x + w / 2 - side / 2, 0), image.width - side)))
    top = int(round(min(max(y + h / 2 - side / 2, 0), image.height - side)))
    return image.crop((left, top, left + side, top + side))


def build_face_examples(items, out_dir, rng: random.Random) -> list[Example]:
    """(image path, caption[, face box [x, y, w, h]]) -> face examples; half of those with a box, chosen with
    `rng`, get a zoomed crop around the face as the condition, the others the image itself."""
    boxed = [k for k, item in enumerate(items) if len(item) > 2 and item[2] is not None]
    zoomed = set(rng.sample(boxed, len(boxed) // 2))
    os.makedirs(os.path.join(out_dir, "faces"), exist_ok=True)
    examples = []
    for k, (path, caption, *rest) in enumerate(items):
        path = os.path.abspath(path)
        if not os.path.isfile(path):
            raise EngineError(f"face image {path} (item {k}) does not exist")
        condition = path
        if k in zoomed:
            box = rest[0]
            if len(box) != 4 or box[2] <= 0 or box[3] <= 0:
                raise EngineError(f"face box of item {k} must be [x, y, w, h] with w, h > 0, got {box}")
            stem = os.path.splitext(os.path.basename(path))[0]
            condition = os.path.abspath(os.path.join(out_dir, "faces", f"{k}_{stem}.png"))
            face_crop(load_image(path), box).save(condition)
        examples.append(Example(condition, path, caption, "face"))
    return examples


def replication_examples(images_with_captions) -> list[Example]:
    """(image path, caption) pairs -> everything examples whose condition is their target."""
    examples = []
    for path, caption in images_with_captions:
        path = os.path.abspath(path)
        if not os.path.isfile(path):
            raise EngineError(f"replication image {path} does not exist")
        examples.append(Example(path, path, caption, "everything"))
    return examples


COLOURS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (230, 200, 40),
           "purple": (130, 50, 160), "orange": (240, 130, 30), "white": (240, 240, 240), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")


def _scene(rng: random.Random, size: int) -> list[tuple[str, tuple[int, int, int, int]]]:
    """A few shapes: [(shape, box (x0, y0, x1, y1))]."""
    out = []
    for _ in range(rng.randint(1, 3)):
        s = rng.randint(size // 5, size // 2)
        x, y = rng.randint(0, size - s), rng.randint(0, size - s)
        out.append((rng.choice(SHAPES), (x, y, x + s, y + s)))
    return out


def _draw(scene, palette: list[str], size: int, outline: int = 0) -> Image.Image:
    """Shapes on a background; palette[0] is the background, palette[1:] the shapes' colours in turn."""
    image = Image.new("RGB", (size, size), COLOURS[palette[0]])
    draw = ImageDraw.Draw(image)
    for k, (shape, (x0, y0, x1, y1)) in enumerate(scene):
        colour = COLOURS[palette[1 + k % (len(palette) - 1)]]
        kw = {"outline": colour, "width": outline} if outline else {"fill": colour}
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), **kw)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), **kw)
        else:
            draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], **kw)
    return image


def _draw_face(image: Image.Image, box, skin, eyes) -> Image.Image:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    draw = ImageDraw.Draw(image)
    draw.ellipse(box, fill=COLOURS[skin])
    for ex in (x0 + w * 0.3, x0 + w * 0.7):
        draw.ellipse((ex - w * 0.08, y0 + h * 0.3, ex + w * 0.08, y0 + h * 0.45), fill=COLOURS[eyes])
    draw.arc((x0 + w * 0.25, y0 + h * 0.4, x0 + w * 0.75, y0 + h * 0.8), 20, 160, fill=COLOURS[eyes], width=2)
    return image


def _describe(scene, palette) -> str:
    things = [f"{palette[1 + k % (len(palette) - 1)]} {shape}" for k, (shape, _) in enumerate(scene)]
    return f"a {' and a '.join(things)} on a {palette[0]} background"


def _synthetic_pair(task: str, rng: random.Random, size: int):
    """-> (target, condition, caption, object name) for one synthetic example of `task`."""
    scene, palette = _scene(rng, size), rng.sample(sorted(COLOURS), 4)
    target, caption = _draw(scene, palette, size), _describe(scene, palette)
    if task == "everything":
        return target, target, caption, None
    if task == "style":  # the same palette and stroke on other shapes
        stroke = rng.choice((0, 1, 3))
        return _draw(scene, palette, size, stroke), _draw(_scene(rng, size), palette, size, stroke), caption, None
    if task == "composition":  # the same shapes where they are, as outlines in another palette
        other = rng.sample([c for c in sorted(COLOURS) if c not in palette[:2]], 2)
        return target, _draw(scene, other, size, outline=2), caption, None
    if task == "object":
        shape, box = scene[0]
        return target, pad_square(target.crop(box), _random_colour(rng)), caption, shape
    s = rng.randint(size // 3, size // 2)
    x, y = rng.randint(0, size - s), rng.randint(0, size - s)
    skin, eyes = rng.sample([c for c in sorted(COLOURS) if c != palette[0]], 2)
    _draw_face(target, (x, y, x + s, y + s), skin, eyes)
    return target, face_crop(target, (x, y, s, s)), f"a drawing of a {skin} face, {caption}", None


def make_synthetic(folder, n: int, seed: int = 0, size: int = 64) -> str:
    """n drawn examples cycling over the five tasks -> folder/images/*.png and folder/manifest.jsonl (returned)."""
    if n < 1 or size < 16:
        raise EngineError(f"make_synthetic needs n >= 1 and size >= 16, got n={n}, size={size}")
    rng = random.Random(seed)
    images = os.path.join(os.path.abspath(folder), "images")
    os.makedirs(images, exist_ok=True)
    examples = []
    for k in range(n):
        task = TASKS[k % len(TASKS)]
        target, condition, caption, name = _synthetic_pair(task, rng, size)
        paths = [os.path.join(images, f"{k:05d}_{role}.png") for role in ("target", "condition")]
        target.save(paths[0])
        if condition is target:
            paths[1] = paths[0]
        else:
            condition.save(paths[1])
        examples.append(Example(paths[1], paths[0], caption, task, object=name))
    return write_manifest(examples, os.path.join(folder, "manifest.jsonl"))
