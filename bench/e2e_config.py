"""What `python -m bench e2e` runs: its configuration, the request every provider answers (the prompts), the
provider names, and which pieces of the engine's fast path each engine provider turns on (`--ladder`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PROMPT = "a lighthouse on a cliff at sunset, best quality, high quality"
NEGATIVE = "monochrome, lowres, bad anatomy, worst quality, low quality"
INSTRUCT = "use the style of this image"
EDIT_PROMPT = "make it look like winter"
PROVIDERS = ("engine", "engine-eager", "diffusers")
PRESETS = ("tiny", "sd15", "tiny-sdxl", "sdxl")  # the weights bench/weights.py builds or takes
ACCEPTED = (*PROVIDERS, "tensorrt", "engine-lcm", "+channels-last", "+fused-attention", "+fused-norms", "+cuda-graphs",
            "+compile", "+bf16")  # tensorrt: on request only; "+...": the --ladder steps


@dataclass(frozen=True)
class E2EConfig:
    preset: str = "tiny"
    device: str = "cpu"
    dtype: str = "float32"
    batches: tuple[int, ...] = (1,)
    steps: int = 30
    height: int | None = None
    width: int | None = None
    guidance_mode: str = "simple"
    providers: tuple[str, ...] = PROVIDERS
    scheduler: str | None = None  # every provider's (default: the model's own)
    few_steps: int = 4            # the `engine-lcm` provider: the fast path with the LCM scheduler at this many steps
    repeats: int = 5
    scale: float = 0.8
    guidance_scale: float = 6.0
    compile: bool = False   # torch.compile the engine's UNet (the `engine` provider only)
    cuda_graphs: bool = False  # replay the engine's UNet step from CUDA graphs (the `engine` provider, CUDA)
    interleave: bool = False      # every provider loaded at once, their timed calls in turn (a drifting machine)
    profile_dir: str | None = None  # one more request per provider and batch under torch.profiler (bench.profiling)
    engines: str | None = None  # the `tensorrt` provider's plans (default: built into the bench cache)
    trt: str = "auto"           # ... and which TensorRT builds and runs them: auto, full or rtx (engine.trt)
    task: str = "generate"  # or "edit": InstructPix2Pix, three guidance branches (guidance_mode "ip2p"); "img2img" and
    # "inpaint": generate's request started from a photo (and a mask), beside diffusers' img2img / inpaint pipelines
    strength: float | None = None  # img2img / inpaint: how far from the photo (None: diffusers' 0.8 / 1.0)
    image_guidance_scale: float = 1.5  # the edit task's s_I
    adapters: int = 1             # generate: this many adapters at once (the adapter file repeated)
    adapter_masks: bool = False   # ... each in its own vertical stripe of the image


@dataclass(frozen=True)
class FastPath:
    """Which pieces of the engine's fast path a provider turns on."""
    channels_last: bool = False
    fused_attention: bool = False   # the Triton decoupled attention and projector
    fused_norms: bool = False       # GroupNorm+SiLU and GEGLU kernels in the UNet and VAE
    cuda_graphs: bool = False
    compile: bool = False
    bf16: bool = False              # the whole pipeline in bfloat16 (the CPU ladder's step)

    def unavailable(self, device: torch.device) -> str | None:
        if self.bf16 and device.type == "cpu" and not cpu_has_bf16():
            return ("this CPU has no bf16 instructions (AVX512-BF16 or AMX): PyTorch emulates bf16 there, slower "
                    "than float32 (docs/results.md)")
        if device.type != "cuda" and (self.fused_attention or self.fused_norms):
            return "the fused kernels need CUDA (on the CPU the Triton interpreter's timings mean nothing)"
        if device.type != "cuda" and self.cuda_graphs:
            return "CUDA graphs need CUDA"
        return None


# `--ladder`: the fast path one piece at a time, each step the one before plus its name (issue 4: "measure each
# step's effect"); compile is the last step without CUDA graphs (the two are alternatives for the UNet step)
_BASE = FastPath(channels_last=True, fused_attention=True, fused_norms=True)
LADDER = {
    "engine-eager": FastPath(),
    "+channels-last": FastPath(channels_last=True),
    "+fused-attention": FastPath(channels_last=True, fused_attention=True),
    "+fused-norms": _BASE,
    "+cuda-graphs": FastPath(**{**_BASE.__dict__, "cuda_graphs": True}),
    "+compile": FastPath(**{**_BASE.__dict__, "compile": True}),
}


# `--ladder` on the CPU (issue 31): each option the CPU can take, alone on top of engine-eager, so that one that
# loses here does not hide inside the next step's figure
CPU_LADDER = {
    "engine-eager": FastPath(),
    "+channels-last": FastPath(channels_last=True),
    "+bf16": FastPath(bf16=True),
    "+compile": FastPath(compile=True),
}


def ladder(device: torch.device) -> dict[str, FastPath]:
    """The `--ladder` steps on this device: cumulative on CUDA (LADDER), each alone on the CPU (CPU_LADDER)."""
    return LADDER if device.type == "cuda" else CPU_LADDER


def cpu_has_bf16() -> bool:
    import torch  # deferred: as everywhere in this module

    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def fast_path(name: str, device: torch.device, cfg: E2EConfig) -> FastPath:
    if name in ("engine", "engine-lcm"):  # the whole fast path where it applies, plus the options asked for
        cuda = device.type == "cuda"
        return FastPath(channels_last=cuda, fused_attention=cuda, fused_norms=cuda, cuda_graphs=cfg.cuda_graphs,
                        compile=cfg.compile)
    steps = ladder(device)
    return steps.get(name) or LADDER.get(name) or CPU_LADDER[name]
