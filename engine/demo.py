"""What `make demo` runs: build tiny weights once (or take real ones), draw a condition image, generate,
write PNGs and print per-stage timings."""
from __future__ import annotations

import os
import time

from PIL import Image, ImageDraw

from ipadapter_instruct.engine.output import write_images
from ipadapter_instruct.engine.selfcheck import summary
from ipadapter_instruct.engine.tiny import make_tiny, tiny_paths

DEMO_PROMPT = "a lighthouse on a cliff at sunset, best quality, high quality"
DEMO_INSTRUCT = "use the composition of this image"


def cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "ipadapter-instruct-engine", "tiny-v1")


def ensure_tiny(folder: str) -> dict[str, str]:
    paths = tiny_paths(folder)
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    print(f"building tiny random weights into {folder} (once)")
    return make_tiny(folder)


def draw_condition_image(size: int = 256) -> Image.Image:
    """A simple scene with clear composition and colour: sky gradient, sun, hills, a tower."""
    img = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(img)
    for y in range(size):
        t = y / size
        d.line([(0, y), (size, y)], fill=(int(250 - 120 * t), int(170 - 90 * t), int(90 + 120 * t)))
    s = size / 256
    d.ellipse([150 * s, 40 * s, 210 * s, 100 * s], fill=(255, 230, 120))
    d.polygon([(0, 200 * s), (90 * s, 140 * s), (180 * s, 190 * s), (256 * s, 150 * s), (256 * s, 256 * s), (0, 256 * s)],
              fill=(40, 90, 60))
    d.rectangle([60 * s, 90 * s, 80 * s, 170 * s], fill=(235, 235, 235))
    d.polygon([(56 * s, 90 * s), (70 * s, 70 * s), (84 * s, 90 * s)], fill=(200, 40, 40))
    return img


def run_demo(pipe, out: str, image: Image.Image, random_weights: bool, steps: int, seed: int,
             instruct: str = DEMO_INSTRUCT, prompt: str = DEMO_PROMPT, print_fn=print) -> str:
    t0 = time.perf_counter()
    pipe(prompt=prompt, image=image, instruct=instruct, num_inference_steps=1, seed=seed)
    print_fn(f"warm-up (one 1-step request, not counted below): {(time.perf_counter() - t0) * 1e3:.1f} ms; "
             f"{summary(pipe.fast_path_report())}")
    images = pipe(prompt=prompt, image=image, instruct=instruct, num_inference_steps=steps, seed=seed)
    cond_path = os.path.splitext(out)[0] + "-condition.png"
    write_images([images[0], image], [out, cond_path], overwrite=True)  # each run replaces the last
    print_fn(f"device {pipe.device}, dtype {str(pipe.dtype).replace('torch.', '')}, {steps} steps, "
             f"{images[0].size[0]}x{images[0].size[1]}, instruction {instruct!r}")
    for key, ms in pipe.timings.items():
        print_fn(f"  {key:<20} {ms:10.1f}")
    print_fn(f"wrote {out} (condition image: {cond_path})")
    if random_weights:
        print_fn("NOTE: these are tiny RANDOM weights, so the image is noise by design. For real images pass "
                 "--model (SD1.5 diffusers folder), --image-encoder (CLIP ViT-H/14) and --adapter "
                 "(ip-adapter-instruct-sd15.bin).")
    return out
