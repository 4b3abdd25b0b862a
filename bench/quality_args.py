"""`python -m bench quality`'s flags, apart from the scoring so that `--help` imports no torch."""
from __future__ import annotations

import os


def add_quality_args(p) -> None:
    p.add_argument("--manifest", required=True, help="held-out JSONL: condition, caption, task [, prompt, "
                   "instruction, generated]; relative paths from its folder")
    p.add_argument("--clip", required=True, help="transformers CLIPModel folder with tokenizer and image processor")
    p.add_argument("--generated", default=None, help="folder of generated images named <record index>.png "
                   "(default: each record's `generated` field)")
    p.add_argument("--model", help="generate with the engine: diffusers SD1.5 folder (with the next two)")
    p.add_argument("--image-encoder", help="CLIPVisionModelWithProjection folder for the engine")
    p.add_argument("--adapter", help="IPAdapter-Instruct file for the engine")
    p.add_argument("--out", default=None, help="folder for the engine's images, as <record index>.png")
    p.add_argument("--prompt", default=None, help="prompt for records without one (default: the engine's)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0, help="record i is generated with seed + i")
    p.add_argument("--scale", type=float, default=0.8, help="adapter scale")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="engine dtype (default: float16 on cuda, float32 on cpu); CLIP runs in float32")
    p.add_argument("--batch", type=int, default=8, help="requests per engine call and images per CLIP batch")
    p.add_argument("--limit", type=int, default=None, help="score only the first N records")
    p.add_argument("--json", default=os.path.join("out", "bench-quality.json"), help="where the result rows go")
