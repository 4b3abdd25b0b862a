"""What an exported graph is, apart from any model: its tensors (`Tensor`: name, dtype, shape of ints and axis
names, meaning, how to fill a sample), its spec (`GraphSpec`: the module to trace, inputs, outputs, min/opt/max
axis sizes) and random sample inputs. export/specs.py and export/controlnet.py build the specs of a pipeline."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ipadapter_instruct.engine.exported import resolve_shape

ONNX_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64"}


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str                     # float32 | float16 | int64
    shape: tuple                   # ints and axis names
    meaning: str
    fill: str = "normal"           # sample values: normal | timestep | scale | ids | pixels | unit


@dataclass
class GraphSpec:
    name: str
    module: nn.Module
    inputs: list[Tensor]
    outputs: list[Tensor]
    axes: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # axis -> (min, opt, max)
    vocab: int = 0
    trace: dict[str, int] = field(default_factory=dict)  # axis sizes to trace at, over the opt ones
    notes: dict = field(default_factory=dict)  # extra keys for the graph's manifest entry

    def trace_sizes(self) -> dict[str, int]:
        return {**self.sizes("opt"), **self.trace}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {i: a for i, a in enumerate(t.shape) if isinstance(a, str)} for t in self.inputs + self.outputs}

    def shape(self, t: Tensor, sizes: dict[str, int]) -> tuple[int, ...]:
        return resolve_shape(t.shape, sizes)

    def sizes(self, level: str) -> dict[str, int]:
        i = ("min", "opt", "max").index(level)
        return {a: v[i] for a, v in self.axes.items()}

    def profiles(self) -> dict[str, dict[str, list[int]]]:
        return {lv: {t.name: list(self.shape(t, self.sizes(lv))) for t in self.inputs} for lv in ("min", "opt", "max")}

    def sample(self, sizes: dict[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
        return sample_inputs(self.inputs, sizes, self.vocab, seed)


def sample_inputs(inputs, sizes: dict[str, int], vocab: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of the given axis sizes, each kind in its meaningful range."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in inputs:
        shape = resolve_shape(t.shape, sizes)
        if t.fill == "ids":
            x = torch.randint(0, vocab, shape, generator=g)
        elif t.fill == "timestep":
            x = torch.rand(shape, generator=g) * 999
        elif t.fill == "scale":
            x = torch.rand(shape, generator=g) * 1.5
        elif t.fill == "pixels":
            x = torch.rand(shape, generator=g) * 2 - 1
        elif t.fill == "unit":
            x = torch.rand(shape, generator=g)
        else:
            x = torch.randn(shape, generator=g)
        out[t.name] = x.to(getattr(torch, t.dtype))
    return out
