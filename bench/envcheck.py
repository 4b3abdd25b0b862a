"""`python -m bench.envcheck [--strict]`: what the GPU check (bench/gpu_session.sh) needs, and what is here.

One line per package the check needs: `envcheck: package NAME: present VERSION (DIR)` or `... missing: WHY`,
and whether bench/gpu-requirements.txt carries it as a wheel; then the Python, torch and Triton versions and
the GPU, and any requirement of a carried wheel that what is installed does not satisfy. Run on the GPU machine
before the wheels are installed it shows what the image has (so the wheel list can be trimmed); `--strict`
(after they are installed) exits 1 when anything needed is missing or a requirement conflicts.
Imports nothing heavy at import time and touches no GPU until `main` asks torch about one.
"""
from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import platform
import re
import sys

REQUIREMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu-requirements.txt")

# distribution -> (import name, what needs it)
NEEDED = {
    "torch": ("torch", "everything"),
    "triton": ("triton", "the fused kernels"),
    "numpy": ("numpy", "the tests, diffusers"),
    "transformers": ("transformers", "the text and image encoders"),
    "diffusers": ("diffusers", "the UNet, VAE and schedulers; the diffusers provider"),
    "huggingface-hub": ("huggingface_hub", "diffusers, transformers"),
    "safetensors": ("safetensors", "weights on disk"),
    "pillow": ("PIL", "images"),
    "importlib-metadata": ("importlib_metadata", "diffusers"),
    "regex": ("regex", "diffusers"),
    "requests": ("requests", "diffusers"),
    "filelock": ("filelock", "diffusers"),
    "tqdm": ("tqdm", "progress bars"),
    "pytest": ("pytest", "the GPU tests"),
    "pytest-timeout": ("pytest_timeout", "the GPU tests' per-test time limit"),
    "cupy": ("cupy", "the cubin launches (kernels/launch.py)"),
}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_names(path: str) -> set[str]:
    """The normalised package names of a list such as gpu-image.txt, one a line ('#' starts a comment)."""
    with open(path) as f:
        names = (line.split("#", 1)[0].strip() for line in f)
        return {normalize(name) for name in names if name}


# what the GPU image brings: its package list (gpu-image.txt, from the device tool's KINDS.md), names normalised
IMAGE = frozenset(read_names(os.path.join(os.path.dirname(REQUIREMENTS), "gpu-image.txt")))


def carried() -> dict[str, str]:
    """gpu-requirements.txt: normalised name -> the requirement line."""
    out = {}
    with open(REQUIREMENTS) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                out[normalize(re.split(r"[<>=!~ ;\[]", line, maxsplit=1)[0])] = line
    return out


def dist_version(dist: str, module: str) -> str | None:
    for name in (dist, *md.packages_distributions().get(module, ())):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            continue
    return None


def package_lines(wheels: dict[str, str]) -> tuple[list[str], list[str]]:
    lines, missing = [], []
    for dist, (module, why) in NEEDED.items():
        carry = "carried as a wheel" if dist in wheels else "not carried"
        spec = importlib.util.find_spec(module)
        if spec is None:
            missing.append(dist)
            lines.append(f"envcheck: package {dist}: missing: needed by {why} ({carry})")
            continue
        where = os.path.dirname(os.path.dirname(spec.origin or next(iter(spec.submodule_search_locations or ["?"]))))
        version = dist_version(dist, module) or "(no version metadata)"
        lines.append(f"envcheck: package {dist}: present {version} ({where}; {carry})")
    return lines, missing


def conflicts(wheels: dict[str, str]) -> list[str]:
    """Requirements of the carried packages (as installed) that the installed versions do not meet."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return ["envcheck: cannot check requirement versions: packaging is not importable"]
    out = []
    for name in wheels:
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                found = md.version(req.name)
            except md.PackageNotFoundError:
                out.append(f"envcheck: conflict: {name} needs {req}, which is missing")
                continue
            if req.specifier and not req.specifier.contains(found, prereleases=True):
                out.append(f"envcheck: conflict: {name} needs {req}, found {found}")
    return out


def runtime_lines() -> list[str]:
    lines = [f"envcheck: python {platform.python_version()} ({sys.executable})"]
    try:
        import torch
    except ImportError as e:
        return lines + [f"envcheck: torch not importable: {e}"]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    lines.append(f"envcheck: torch {torch.__version__} (CUDA {torch.version.cuda}; GPU: {gpu})")
    try:
        import triton
        lines.append(f"envcheck: triton {triton.__version__}")
    except ImportError as e:
        lines.append(f"envcheck: triton not importable: {e}")
    return lines


def main(argv: list[str]) -> int:
    wheels = carried()
    lines, missing = package_lines(wheels)
    bad = conflicts(wheels)
    lines += runtime_lines() + bad
    verdict = "ok" if not (missing or bad) else \
        f"{len(missing)} missing ({', '.join(missing) or 'none'}), {len(bad)} conflicting"
    print("\n".join([*lines, f"envcheck: {verdict}"]), flush=True)
    return 1 if "--strict" in argv and (missing or bad) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
