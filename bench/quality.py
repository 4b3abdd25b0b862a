"""`python -m bench quality`: the paper's CLIP metrics (Sec. 4.1, Table 1) on a held-out manifest.

Images come from a folder (`--generated DIR`: `<record index>.png`, or each record's `generated` field) or
are generated here with the engine (`--model/--image-encoder/--adapter`, written to `--out DIR` if given).
The CLIP model is a transformers `CLIPModel` folder (`--clip`), its projected embeddings
(`get_image_features` / `get_text_features`), unit-normalised, in float32. Per record, with
g, c the generated and condition image embeddings, p the generation prompt's and k the condition caption's:

- CLIP-I = cos(g, c), as in IP-Adapter. Table 1's values (.53 to .92) fit plain cosines; a 2.5 factor would
  put replication's image-image cosine at .36, far too low for near-copies.
- CLIP-T = 2.5 * max(cos(g, k), 0) and CLIP-P = 2.5 * max(cos(g, p), 0): CLIPScore (Hessel et al. 2021)
  with its w = 2.5. The paper does not give w; Table 1 decides it: CLIP-T .8542 and CLIP-P .60 to .78 mean
  image-text cosines of .24 to .34, CLIP's usual range for matching pairs, while w = 1 would need image-text
  cosines of .6 to .85, far above what CLIP's image and text embeddings reach.
- CLIP-S = (g - p) . (c - k), the dot product of the differences of the unit-normalised embeddings (range
  -4 to 4). Here the paper is ambiguous: its text says "cosine similarity", but Table 1 reports 1.0988 to
  1.1171, above a cosine's bound of 1, and it names neither w nor the CLIP model it used. We read it as what
  code does when it normalises each CLIP embedding first (as CLIP evaluation code does), subtracts, and takes
  the "cosine" as a dot product. A rough estimate supports it: CLIP's modality gap makes |g - p|^2 =
  2 - 2 cos(g, p) ~ 1.4 and the two differences point much the same way (cos ~ .6 to .8), so the dot product
  lands near 1.1, Table 1's scale, where 2.5 * cos of the differences would give ~1.5 to 2. The literal
  reading, cos(g - p, c - k), is reported beside it as CLIP-S-cos (at most 1), so either can be compared.

Per task the table and the JSON rows carry Table 1's columns (replication: I, T; style: S, P and S-cos;
object, composition, face: I, P); any other task gets every metric. Rows: op "quality", provider
"generated" or "engine", x_name "task", p20/p50/p80 over the task's records, config with count and mean.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F

from ipadapter_instruct.bench.common import Row, device_name, format_table, git_sha
from ipadapter_instruct.bench.quality_args import add_quality_args  # noqa: F401 (the flags, kept light for --help)

CLIPSCORE_W = 2.5
METRICS = ("CLIP-I", "CLIP-T", "CLIP-P", "CLIP-S", "CLIP-S-cos")
UNITS = {"CLIP-I": "cosine", "CLIP-T": "clipscore", "CLIP-P": "clipscore", "CLIP-S": "dot", "CLIP-S-cos": "cosine"}
TABLE1 = {"replication": ("CLIP-I", "CLIP-T"), "style": ("CLIP-S", "CLIP-P", "CLIP-S-cos"),
          "object": ("CLIP-I", "CLIP-P"), "composition": ("CLIP-I", "CLIP-P"), "face": ("CLIP-I", "CLIP-P")}
PAPER = {"replication": {"CLIP-I": 0.9098, "CLIP-T": 0.8542}, "style": {"CLIP-S": 1.1171, "CLIP-P": 0.7776},
         "object": {"CLIP-I": 0.8040, "CLIP-P": 0.6402}, "composition": {"CLIP-I": 0.7082, "CLIP-P": 0.6517},
         "face": {"CLIP-I": 0.5264, "CLIP-P": 0.5976}}  # Table 1, IPAdapter-Instruct row
ALIASES = {"everything": "replication", "faces": "face", "color": "colour"}
# the reference release's queries for its trained tasks (its README), used when a record has no `instruction`
INSTRUCTIONS = {"replication": "use everything from the image", "style": "use the style", "colour": "use the colour",
                "pose": "use the pose", "composition": "use the composition", "face": "use the face",
                "foreground": "use the foreground", "background": "use the background", "object": "use the object"}
REQUIRED = ("condition", "caption", "task")


class QualityError(Exception):
    """Bad input to the quality benchmark; the message is one line naming the path or record."""


@dataclass(frozen=True)
class QualityConfig:
    manifest: str
    clip: str
    generated: str | None = None     # folder of `<index>.png`; None: records' `generated` fields or the engine
    model: str | None = None         # engine weights: all three or none
    image_encoder: str | None = None
    adapter: str | None = None
    out: str | None = None           # where engine images go, as `<index>.png`
    prompt: str | None = None        # default prompt for records without one (None: the engine's default)
    steps: int = 30
    seed: int = 0                    # record i uses seed + i
    scale: float = 0.8
    device: str | None = None
    dtype: str | None = None
    batch: int = 8                   # requests per engine call and records per CLIP batch
    limit: int | None = None         # only the first N records


def canonical(task: str) -> str:
    return ALIASES.get(task, task)


def task_metrics(task: str) -> tuple[str, ...]:
    return TABLE1.get(canonical(task), METRICS)


# ---- metrics ------------------------------------------------------------------------------------------

def metrics_from_embeddings(gen, cond, prompt, caption) -> dict[str, torch.Tensor]:
    """gen, cond: (N, E) image embeddings; prompt, caption: (N, E) text embeddings (any norm). -> (N,) each."""
    g, c, p, k = (F.normalize(t.float(), dim=-1) for t in (gen, cond, prompt, caption))
    return {"CLIP-I": (g * c).sum(-1),
            "CLIP-T": CLIPSCORE_W * (g * k).sum(-1).clamp(min=0),
            "CLIP-P": CLIPSCORE_W * (g * p).sum(-1).clamp(min=0),
            "CLIP-S": ((g - p) * (c - k)).sum(-1),
            "CLIP-S-cos": F.cosine_similarity(g - p, c - k, dim=-1)}


def _projected(out) -> torch.Tensor:
    # transformers 5 returns an output whose pooler_output is the projected embedding; 4 returned the tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def check_clip_folder(clip_dir: str) -> None:
    if not os.path.isdir(clip_dir):
        raise QualityError(f"CLIP model folder not found: {clip_dir} (want a transformers CLIPModel folder)")
    try:
        with open(os.path.join(clip_dir, "config.json")) as fh:
            kind = json.load(fh).get("model_type")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind != "clip":
        raise QualityError(f"{clip_dir} holds a {kind!r} model, not a CLIPModel (model_type 'clip', both towers "
                           f"and their projections)")
    if not os.path.isfile(os.path.join(clip_dir, "preprocessor_config.json")):
        raise QualityError(f"no preprocessor_config.json in the CLIP folder {clip_dir}: save the model's "
                           f"CLIPImageProcessor beside it")


class ClipScorer:
    """A CLIPModel folder with its tokenizer and image processor, in float32 on `device`."""

    def __init__(self, clip_dir: str, device="cpu"):
        from transformers import AutoTokenizer, CLIPModel

        from ipadapter_instruct.engine.loading import _image_processor_class

        check_clip_folder(clip_dir)
        self.device = torch.device(device)
        try:
            self.model = CLIPModel.from_pretrained(clip_dir).to(self.device, torch.float32).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(clip_dir)
            self.processor = _image_processor_class().from_pretrained(clip_dir)
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise QualityError(f"cannot load a CLIPModel with its tokenizer from {clip_dir}: {first}") from e
        self.max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)

    @torch.inference_mode()
    def image_embeddings(self, images) -> torch.Tensor:
        """images: list of PIL images -> (N, E) projected embeddings, not normalised."""
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return _projected(self.model.get_image_features(pixel_values=pixels.to(self.device)))

    @torch.inference_mode()
    def text_embeddings(self, texts) -> torch.Tensor:
        """texts: list of str -> (N, E) projected embeddings, not normalised (truncated to CLIP's length)."""
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        return _projected(self.model.get_text_features(input_ids=tok["input_ids"],
                                                       attention_mask=tok["attention_mask"]))

    def score(self, items: list[dict]) -> list[dict]:
        n = len(items)
        images = self.image_embeddings([it["generated"] for it in items] + [it["condition"] for it in items])
        texts = self.text_embeddings([it["prompt"] for it in items] + [it["caption"] for it in items])
        m = metrics_from_embeddings(images[:n], images[n:], texts[:n], texts[n:])
        return [{"index": it["index"], "task": it["task"], **{k: float(v[i]) for k, v in m.items()}}
                for i, it in enumerate(items)]


def _chunks(items, size: int):
    chunk = []
    for it in items:
        chunk.append(it)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def clip_metrics(clip_dir: str, items, device="cpu", batch_size: int = 16) -> list[dict]:
    """items: iterable of dicts with `generated` and `condition` (PIL images), `caption`, `prompt`, `task`
    (and optionally `index`). -> one dict per item: index, task and every metric in METRICS."""
    scorer = ClipScorer(clip_dir, device)
    items = ({"index": i, **it} for i, it in enumerate(items))
    return [r for chunk in _chunks(items, batch_size) for r in scorer.score(chunk)]


# ---- the manifest and the images --------------------------------------------------------------------

def read_manifest(path: str, limit: int | None = None) -> list[dict]:
    """JSONL with condition, caption, task (and optional prompt, instruction, generated); other keys ignored.
    Relative paths are taken from the manifest's folder. -> records with `index` (blank lines skipped)."""
    if not os.path.isfile(path):
        raise QualityError(f"manifest not found: {path} (want a JSONL file, one record per line)")
    base = os.path.dirname(os.path.abspath(path))
    records = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise QualityError(f"{path} line {lineno} is not JSON: {e.msg}") from None
            missing = [k for k in REQUIRED if not isinstance(rec, dict) or k not in rec]
            if missing:
                raise QualityError(f"{path} line {lineno} lacks {', '.join(missing)} (each record needs "
                                   f"{', '.join(REQUIRED)})")
            rec = dict(rec, index=len(records))
            for key in ("condition", "generated"):
                if rec.get(key) is not None:
                    rec[key] = os.path.join(base, rec[key])
            records.append(rec)
            if limit is not None and len(records) == limit:
                break
    if not records:
        raise QualityError(f"manifest {path} has no records")
    return records


def check_records(records: list[dict], folder: str | None, generate: bool) -> None:
    """Every image path (and with `generate` every instruction) before any model loads."""
    for rec in records:
        if not os.path.isfile(rec["condition"]):
            raise QualityError(f"condition image of record {rec['index']} not found: {rec['condition']}")
        if generate:
            instruction_for(rec)
        elif not os.path.isfile(path := generated_path(rec, folder)):
            raise QualityError(f"generated image of record {rec['index']} not found: {path}")


def generated_path(rec: dict, folder: str | None) -> str:
    if folder is not None:
        return os.path.join(folder, f"{rec['index']}.png")
    if rec.get("generated") is None:
        raise QualityError(f"record {rec['index']} has no `generated` field and no --generated DIR was given "
                           f"(or pass --model, --image-encoder and --adapter to generate)")
    return rec["generated"]


def folder_items(records: list[dict], folder: str | None, prompt: str):
    """Records -> items with the images read from disk (lazily, one at a time)."""
    from ipadapter_instruct.engine.loading import load_image

    for rec in records:
        yield {"index": rec["index"], "task": rec["task"], "caption": rec["caption"],
               "prompt": rec.get("prompt") or prompt,
               "condition": load_image(rec["condition"], f"condition image of record {rec['index']}"),
               "generated": load_image(generated_path(rec, folder), f"generated image of record {rec['index']}")}


def instruction_for(rec: dict) -> str:
    if rec.get("instruction"):
        return rec["instruction"]
    task = canonical(rec["task"])
    if task not in INSTRUCTIONS:
        raise QualityError(f"record {rec['index']} has task {rec['task']!r} and no `instruction`; give one, or use "
                           f"a task with a default: {', '.join(INSTRUCTIONS)}")
    return INSTRUCTIONS[task]


def engine_items(records: list[dict], cfg: QualityConfig, prompt: str):
    """Records -> items generated with the engine, `cfg.batch` requests per call; saved to cfg.out if set."""
    from ipadapter_instruct.engine import Pipeline
    from ipadapter_instruct.engine.loading import load_image

    pipe = Pipeline.from_pretrained(cfg.model, image_encoder=cfg.image_encoder, adapter=cfg.adapter,
                                    device=cfg.device, dtype=cfg.dtype)
    pipe.set_progress_bar_config(disable=True)
    if cfg.out:
        os.makedirs(cfg.out, exist_ok=True)
    for chunk in _chunks(records, cfg.batch):
        conds = [load_image(r["condition"], f"condition image of record {r['index']}") for r in chunk]
        prompts = [r.get("prompt") or prompt for r in chunk]
        images = pipe(prompt=prompts, image=conds, instruct=[instruction_for(r) for r in chunk], scale=cfg.scale,
                      num_inference_steps=cfg.steps, seed=[cfg.seed + r["index"] for r in chunk])
        for rec, cond, text, image in zip(chunk, conds, prompts, images):
            if cfg.out:
                image.save(os.path.join(cfg.out, f"{rec['index']}.png"))
            yield {"index": rec["index"], "task": rec["task"], "caption": rec["caption"], "prompt": text,
                   "condition": cond, "generated": image}


# ---- aggregation, table, rows -------------------------------------------------------------------------

def by_task(results: list[dict]) -> dict[str, list[dict]]:
    """Results grouped by task: Table 1's tasks first in its order, then the others by name."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["task"], []).append(r)
    order = {task: i for i, task in enumerate(TABLE1)}
    return dict(sorted(groups.items(), key=lambda kv: (order.get(canonical(kv[0]), len(order)), kv[0])))


def quality_rows(results: list[dict], provider: str, device: str, dtype: str, config: dict) -> list[Row]:
    env = dict(device=device, dtype=dtype, git_sha=git_sha())
    rows = []
    for task, group in by_task(results).items():
        for metric in task_metrics(task):
            values = np.array([r[metric] for r in group])
            p20, p50, p80 = (float(v) for v in np.percentile(values, [20, 50, 80]))
            rows.append(Row("quality", provider, metric, UNITS[metric], "task", task, p20, p50, p80,
                            config={**config, "count": len(group), "mean": float(values.mean())}, **env))
    return rows


def quality_table(results: list[dict]) -> str:
    """Per task: record count and the mean of each of its Table 1 metrics; the paper's value beneath."""
    lines = []
    for task, group in by_task(results).items():
        wanted = task_metrics(task)
        lines.append([task, str(len(group))] + [f"{np.mean([r[m] for r in group]):.4f}" if m in wanted else ""
                                                for m in METRICS])
        paper = PAPER.get(canonical(task))
        if paper:
            lines.append(["(paper)", ""] + [f"{paper[m]:.4f}" if m in paper else "" for m in METRICS])
    return format_table(["task", "n", *METRICS], lines)


def run_quality(cfg: QualityConfig) -> tuple[list[Row], str]:
    """Score (and with engine weights first generate) every record of cfg.manifest. -> (rows, table)."""
    from ipadapter_instruct.engine.pipeline import DEFAULT_PROMPT

    engine_args = [cfg.model, cfg.image_encoder, cfg.adapter]
    if any(engine_args) and not all(engine_args):
        raise QualityError("give all of --model, --image-encoder and --adapter to generate, or none to score "
                           "existing images")
    if all(engine_args) and cfg.generated:
        raise QualityError("give either --generated DIR (score existing images) or the engine weights, not both")
    if cfg.generated is not None and not os.path.isdir(cfg.generated):
        raise QualityError(f"generated image folder not found: {cfg.generated} (want <record index>.png files)")
    if cfg.batch < 1 or cfg.steps < 1:
        raise QualityError(f"--batch and --steps must be positive, got {cfg.batch} and {cfg.steps}")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QualityError("--device cuda but no CUDA GPU is available")
    records = read_manifest(cfg.manifest, cfg.limit)
    check_clip_folder(cfg.clip)
    check_records(records, cfg.generated, generate=all(engine_args))
    scorer = ClipScorer(cfg.clip, device)  # checked before any generation
    prompt = cfg.prompt or DEFAULT_PROMPT
    config = dict(manifest=cfg.manifest, clip=cfg.clip, clip_dtype="float32", clipscore_w=CLIPSCORE_W)
    if all(engine_args):
        provider, dtype = "engine", cfg.dtype or ("float16" if device.type == "cuda" else "float32")
        config.update(model=cfg.model, adapter=cfg.adapter, steps=cfg.steps, seed=cfg.seed, scale=cfg.scale)
        items = engine_items(records, replace(cfg, device=str(device), dtype=dtype), prompt)
    else:
        provider, dtype = "generated", "float32"
        config.update(generated=cfg.generated)
        items = folder_items(records, cfg.generated, prompt)
    results = [r for chunk in _chunks(items, cfg.batch) for r in scorer.score(chunk)]
    rows = quality_rows(results, provider, device_name(device), dtype, config)
    head = f"device: {device_name(device)}   provider: {provider}   records: {len(results)}   git: {git_sha()}"
    return rows, head + "\n\n" + quality_table(results)


# ---- CLI (wired into bench/__main__.py) ---------------------------------------------------------------

def quality_main(a) -> int:
    from ipadapter_instruct.engine.errors import EngineError

    from ipadapter_instruct.bench.common import quiet_loaders, write_json

    quiet_loaders()
    names = {f.name for f in fields(QualityConfig)}
    cfg = QualityConfig(**{k: v for k, v in vars(a).items() if k in names})
    try:
        rows, table = run_quality(cfg)
    except (QualityError, EngineError) as e:
        print(f"python -m bench quality: error: {e}", file=sys.stderr)
        return 2
    print(table)
    write_json(rows, a.json)
    print(f"\n{len(rows)} rows written to {a.json}")
    return 0
