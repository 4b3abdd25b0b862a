"""Per-task instruction banks: the free text a user gives to say what to take from the condition image.

Each task has a bank `train/instructions/<task>.txt`, one phrasing per line ('#' lines and blank lines are
ignored); any extra `<name>.txt` in the folder is a task too, whose keyword is its name. As in the paper
(Sec. 3.5), a phrasing of task T that contains a keyword of another task is dropped, so no instruction
names two tasks; during training one phrasing is drawn at random per example and step, and for the object
task the whole word "object" becomes the example's class name.

Keyword matching is case-insensitive and anchored at the start of a word (`\\bkeyword`): "Styles" and
"faces" count as "style" and "face", "hairstyle" and "surface" do not. A keyword that is also one of T's own
(possible only with extra banks, e.g. a facial.txt beside face.txt) does not drop T's phrasings.
"""
from __future__ import annotations

import logging
import os
import random
import re

from ipadapter_instruct.engine.errors import EngineError

log = logging.getLogger(__name__)

TASKS = ("everything", "style", "composition", "object", "face")
KEYWORDS: dict[str, tuple[str, ...]] = {
    "everything": ("everything",),
    "style": ("style", "stylistic"),
    "composition": ("composition", "layout"),
    "object": ("object",),
    "face": ("face", "facial"),
}
BANKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "instructions")
_OBJECT_WORD = re.compile(r"\bobject\b", re.IGNORECASE)


def keywords(task: str) -> tuple[str, ...]:
    """The words that identify `task`: KEYWORDS' entry, or the task's own name for tasks it does not list."""
    return KEYWORDS.get(task, (task,))


def mentions(text: str, words) -> list[str]:
    """The words of `words` that start a word of `text`, case-insensitively."""
    return [w for w in words if re.search(r"\b" + re.escape(w), text, re.IGNORECASE)]


def _read_bank(path: str) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        lines = (line.strip() for line in fh)
        return list(dict.fromkeys(line for line in lines if line and not line.startswith("#")))


def load_banks(folder: str | None = None) -> dict[str, list[str]]:
    """Every `<task>.txt` of `folder` (default: the package's banks) -> {task: phrasings}, cross-task ones dropped."""
    folder = BANKS_DIR if folder is None else str(folder)
    if not os.path.isdir(folder):
        raise EngineError(f"instruction folder {folder} does not exist: it should hold one <task>.txt per task")
    names = sorted(f for f in os.listdir(folder) if f.endswith(".txt"))
    if not names:
        raise EngineError(f"instruction folder {folder} has no <task>.txt bank (expected e.g. style.txt)")
    tasks = [n[: -len(".txt")] for n in names]
    tasks.sort(key=lambda t: (TASKS.index(t) if t in TASKS else len(TASKS), t))
    known = set(TASKS) | set(tasks)
    banks = {}
    for task in tasks:
        path = os.path.join(folder, f"{task}.txt")
        foreign = {w for other in known - {task} for w in keywords(other)} - set(keywords(task))
        phrasings = _read_bank(path)
        kept = [p for p in phrasings if not mentions(p, foreign)]
        if len(kept) < len(phrasings):
            log.info("%s: dropped %d of %d phrasings that name another task", path, len(phrasings) - len(kept),
                     len(phrasings))
        if not kept:
            raise EngineError(f"instruction bank {path} is empty once phrasings naming another task are dropped: "
                              f"it needs at least one phrasing without {', '.join(sorted(foreign))}")
        banks[task] = kept
    return banks


def sample_instruction(banks: dict[str, list[str]], task: str, rng: random.Random,
                       object_name: str | None = None) -> str:
    """One phrasing of `task` drawn uniformly with `rng`; for the object task "object" becomes `object_name`."""
    if task not in banks:
        raise EngineError(f"unknown task {task!r}: the instruction banks have {', '.join(banks)}")
    text = rng.choice(banks[task])
    if task != "object":
        return text
    if not isinstance(object_name, str) or not object_name.strip():
        raise EngineError(f"task 'object' needs the example's class name (object_name), got {object_name!r}")
    return _OBJECT_WORD.sub(lambda _: object_name.strip(), text)
