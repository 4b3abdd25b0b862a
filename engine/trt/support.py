"""Which GPUs a TensorRT's plans run on, decided from engines.json and torch's device query alone (no TensorRT is
imported here, so the answers come before any deserialiser runs, and where no TensorRT is installed).

- `build_targets(choice, archs, gpu)`: the compute capabilities `python -m export trt` builds for. TensorRT for
  RTX targets the ones asked (its builder config's compute capabilities; default RTX_DEFAULT_CCS), on any machine;
  the full TensorRT builds for the GPU it runs on, and only that one.
- `refusal(index, folder, gpu)`: one line when the plans of an engines.json cannot run on this GPU, naming the
  GPU, its compute capability, what the builder supports and the other TensorRT; None when they may (TensorRT's
  own validity check and deserialiser still have the last word).
- `python -m engine.trt.support [--trt auto|full|rtx]`: one line, exit 0 when some TensorRT here (the one asked
  for) can run plans on this GPU, 1 with the reason when none can (no GPU, no TensorRT, a Hopper GPU with only
  TensorRT for RTX). Whether a package is installed is read from its import spec, without loading its libraries.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import sys

import torch

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.trt import (CHOICES, FULL_INSTALL, FULL_MIN_CC, NAMES, PACKAGES, RTX_CCS, RTX_DEFAULT_CCS, RTX_INSTALL,
               installed)

COMMANDS = {"full": FULL_INSTALL, "rtx": RTX_INSTALL}


def cc_text(cc: int) -> str:
    """86 -> "8.6", 121 -> "12.1"."""
    return f"{cc // 10}.{cc % 10}"


def cc_list(ccs) -> str:
    return ", ".join(cc_text(c) for c in ccs)


def parse_cc(text: str) -> int:
    major, _, minor = str(text).partition(".")
    return int(major) * 10 + int(minor or 0)


def this_gpu(device=None) -> tuple[str, int] | None:
    """(name, compute capability) of torch's CUDA device, or None without one."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), major * 10 + minor


def build_targets(choice: str, archs, gpu) -> tuple[int, ...]:
    """The compute capabilities a build with `choice` ("full" or "rtx") makes plans for, from --arch (`archs`,
    None for the default) and the building machine's GPU (`gpu`, this_gpu()); EngineError when it cannot."""
    archs = tuple(sorted(set(archs))) if archs else None
    if choice == "rtx":
        wrong = [a for a in archs or () if a not in RTX_CCS]
        if wrong:
            raise EngineError(f"TensorRT for RTX cannot build for compute capability {cc_list(wrong)} (it targets "
                              f"{cc_list(RTX_CCS)}): build those plans with the full TensorRT on that GPU "
                              f"(`{FULL_INSTALL}`, then --trt full)")
        return archs or RTX_DEFAULT_CCS
    if gpu is None:
        raise EngineError("the full TensorRT builds plans on the GPU they will run on, and torch sees no CUDA GPU "
                          "here: build on that GPU, or with TensorRT for RTX (--trt rtx), which needs none")
    name, cc = gpu
    if cc < FULL_MIN_CC:
        raise EngineError(f"the full TensorRT runs on compute capability {cc_text(FULL_MIN_CC)} and newer; this GPU, "
                          f"{name}, is {cc_text(cc)}")
    if archs and archs != (cc,):
        raise EngineError(f"the full TensorRT's plans run only on the GPU that builds them, here {name} (compute "
                          f"capability {cc_text(cc)}): give --arch {cc} or leave --arch out, or build for "
                          f"{cc_list(archs)} with TensorRT for RTX (--trt rtx)")
    return (cc,)


def builder(index: dict) -> str | None:
    """"full" or "rtx": which TensorRT built the plans of an engines.json (None when it does not say)."""
    package = (index.get("tensorrt") or {}).get("package")
    if not package:
        return None
    return "rtx" if str(package).startswith("tensorrt_rtx") else "full"


def _made_by(index: dict) -> str:
    t = index.get("tensorrt") or {}
    return f"{t.get('name', 'TensorRT')} {t.get('version', '?')}"


def choose_for_plans(index: dict, folder: str, trt: str = "auto") -> str:
    """The TensorRT ("full" or "rtx") that can deserialise the plans in `folder`: the one that built them;
    EngineError when `trt` asks for the other."""
    made = builder(index)
    if made is None:
        return trt
    if trt not in ("auto", made):
        raise EngineError(f"the plans in {folder} were built by {_made_by(index)} (engines.json), and {NAMES[trt]} "
                          f"cannot deserialise them: use --trt {made} (or auto), or rebuild them with "
                          f"`python -m export trt ONNX_DIR --out {folder} --trt {trt}`")
    return made


def refusal(index: dict, folder: str, gpu) -> str | None:
    """One line when the plans of `index` (engines.json of `folder`) cannot run on `gpu` ((name, compute
    capability), this_gpu()), else None. Without a GPU: None (TensorRT's own refusal says it)."""
    made = builder(index)
    if gpu is None or made is None:
        return None
    name, cc = gpu
    built = [parse_cc(c) for c in (index.get("tensorrt") or {}).get("compute_capabilities") or ()]
    here = f"this GPU, {name}, is {cc_text(cc)}"
    if made == "rtx":
        targets = built or list(RTX_CCS)  # an engines.json from before the targets were recorded
        if cc in targets:
            return None
        if cc in RTX_CCS:
            return (f"the plans in {folder} were built by {_made_by(index)} for compute capability "
                    f"{cc_list(targets)}; {here}: rebuild them for it with `python -m export trt ONNX_DIR --out "
                    f"{folder} --arch {cc}`" + (" from a float16 export (Turing has no float32 GEMM in TensorRT for "
                                                "RTX)" if cc == 75 else ""))
        return (f"the plans in {folder} were built by {_made_by(index)}, which runs on compute capability "
                f"{cc_list(RTX_CCS)}; {here}: build the plans with the full TensorRT (`{FULL_INSTALL}`, then "
                f"`python -m export trt ONNX_DIR --out {folder} --trt full`) on this GPU")
    if not built or cc in built:
        return None
    gpu_then = (index.get("tensorrt") or {}).get("gpu") or "a GPU"
    return (f"the plans in {folder} were built by {_made_by(index)} on {gpu_then} (compute capability "
            f"{cc_list(built)}), and the full TensorRT's plans run only on the GPU model they were built on; {here}: "
            f"rebuild them on this GPU with `python -m export trt ONNX_DIR --out {folder} --trt full`"
            + (" (or --trt rtx, which builds without a GPU)" if cc in RTX_CCS else ""))


# ----- can some TensorRT run plans here? (python -m engine.trt.support) -----------------------------------------

def _version(choice: str) -> str:
    for dist in importlib.metadata.packages_distributions().get(PACKAGES[choice], ()):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "(version unknown)"


def runnable_here(trt: str = "auto", gpu=None, have=installed) -> tuple[bool, str]:
    """(True, what runs) when the TensorRT `trt` asks for is installed and can build and run plans on `gpu`
    ((name, compute capability); default this_gpu()), else (False, why not)."""
    if trt not in CHOICES:
        return False, f"unknown --trt {trt!r}: choose one of {', '.join(CHOICES)}"
    gpu = gpu or this_gpu()
    if gpu is None:
        return False, "no CUDA GPU: torch.cuda.is_available() is False, so no TensorRT plans can run here"
    name, cc = gpu
    on = f"{name} (compute capability {cc_text(cc)})"
    why = []
    for choice in ("full", "rtx") if trt == "auto" else (trt,):
        if not have(choice):
            why.append(f"{NAMES[choice]} is not installed (`{COMMANDS[choice]}`)")
        elif choice == "full" and cc >= FULL_MIN_CC:
            return True, (f"the full TensorRT {_version('full')} can build and run plans on {on}: "
                          f"python -m export trt ONNX_DIR --trt full")
        elif choice == "rtx" and cc in RTX_CCS:
            return True, (f"TensorRT for RTX {_version('rtx')} runs plans on {on}: "
                          f"python -m export trt ONNX_DIR --trt rtx --arch {cc}")
        else:
            runs = f"{cc_text(FULL_MIN_CC)} and newer" if choice == "full" else cc_list(RTX_CCS)
            why.append(f"{NAMES[choice]} runs on compute capability {runs}")
    return False, f"no TensorRT here can run plans on {on}: {'; '.join(why)}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.trt.support",
                                description="Exit 0 when a TensorRT here can run plans on this GPU, 1 when none can.")
    p.add_argument("--trt", choices=CHOICES, default="auto",
                   help="which TensorRT to ask about (auto: either; full: `import tensorrt`; rtx: TensorRT for RTX)")
    ok, line = runnable_here(p.parse_args(argv).trt)
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
