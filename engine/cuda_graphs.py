"""The UNet step over static buffers, captured once per shape into a CUDA graph (`Pipeline.enable_cuda_graphs`).

A UNet step is about a thousand kernel launches; at SD1.5 sizes on an H100 the launch overhead is a
large part of a 7 ms step. `StaticUNet` keeps one entry per input shape (rows, latent size, adapter
tokens): static tensors for the latents, the timestep, the text rows and every layer's K/V and per-row
adapter scale. Everything a request changes (latents, timestep, K/V of its prompts and images, scales,
guidance rows) is copied into those tensors, so a new request replays the same graph and never
re-captures. K/V, masks and scales are copied once per request (scales again at a step where an adapter's step
range begins or ends), the latents and timestep every step.

With `capture=False` the same static-buffer path runs eagerly: that is how the plumbing is tested on a
machine without a GPU. Capture itself (`capture=True`) needs CUDA and has not run on this project's
machines yet.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from ipadapter_instruct.engine.attention import AdapterContext


@dataclass
class _Entry:
    x: torch.Tensor
    t: torch.Tensor
    text: torch.Tensor
    ctx: AdapterContext
    run: object = None                     # () -> eps rows (replays the graph, or calls the UNet)
    request: object = field(default=None)  # the K/V dict (AdapterContext.kv) whose tensors are in the buffers now
    scales: object = field(default=None)   # the scale dict in the buffers now
    down: list | None = None               # ControlNet residuals (an entry of its own: copied every step)
    mid: torch.Tensor | None = None
    added: dict | None = None              # SDXL's added conditioning per row (text_embeds, time_ids)
    added_src: object = None               # the dict whose tensors are in `added` now


def _clone(t):
    # a tensor, None, or a tuple of them (several adapters' K/V, scales, masks)
    if isinstance(t, tuple):
        return tuple(_clone(x) for x in t)
    return None if t is None else t.clone()


def _copy(dst, src) -> None:
    if isinstance(src, tuple):
        for d, s in zip(dst, src):
            _copy(d, s)
    elif src is not None:
        dst.copy_(src)


def _shape(t):
    if isinstance(t, tuple):
        return tuple(_shape(x) for x in t)
    return None if t is None else tuple(t.shape)


class StaticUNet:
    def __init__(self, unet, capture: bool, warmup: int = 2):
        if capture and not torch.cuda.is_available():
            raise RuntimeError("CUDA graph capture needs a CUDA GPU")
        self.unet, self.capture, self.warmup = unet, capture, warmup
        self.entries: dict[tuple, _Entry] = {}
        # one call at a time through the static buffers: calls from several threads take turns per step
        self._lock = threading.Lock()

    @staticmethod
    def _key(x, t, text, ctx: AdapterContext, control=None, added=None) -> tuple:
        # the timestep's dtype too: PNDM/DDIM give int64 timesteps, Euler fractional float ones, and a float
        # copied into an int buffer would be truncated silently
        layers = tuple((n, _shape(kv), _shape(ctx.scale[n]), _shape(ctx.mask.get(n)))
                       for n, kv in sorted(ctx.kv.items()))
        residuals = None if control is None else tuple(tuple(r.shape) for r in (*control[0], control[1]))
        t = torch.as_tensor(t)  # (a step-level batch gives one timestep per row)
        cond = None if added is None else tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(added.items()))
        return tuple(x.shape), tuple(text.shape), x.dtype, t.dtype, tuple(t.shape), layers, residuals, cond

    def __call__(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, ctx: AdapterContext,
                 control=None, added=None) -> torch.Tensor:
        # x: (rows, 4, h, w) scaled model input; t: () timestep; text: (rows, Lt, cross_dim) -> eps (rows, 4, h, w);
        # control: ControlNet (down residuals, mid residual) of this step, or None; added: SDXL's added
        # conditioning ({"text_embeds", "time_ids"} per row; step-invariant, copied once per call) or None
        with self._lock:
            return self._step(self._key(x, t, text, ctx, control, added), x, t, text, ctx, control, added)

    def _step(self, key, x, t, text, ctx, control, added) -> torch.Tensor:
        e = self.entries.get(key)
        if e is None:
            e = self.entries[key] = self._build(x, t, text, ctx, control, added)
        if added is not None and e.added_src is not added:
            for k, v in added.items():
                e.added[k].copy_(v)
            e.added_src = added
        if e.request is not ctx.kv:  # a new request: its step-invariant tensors into the buffers, once
            for name, kv in ctx.kv.items():
                _copy(e.ctx.kv[name], kv)
            for name, m in ctx.mask.items():
                _copy(e.ctx.mask[name], m)
            e.text.copy_(text)
            e.request = ctx.kv
        if e.scales is not ctx.scale:  # the scales also change where an adapter's step range begins or ends
            for name, s in ctx.scale.items():
                _copy(e.ctx.scale[name], s)
            e.scales = ctx.scale
        e.x.copy_(x)
        e.t.copy_(t)
        if control is not None:
            for dst, src in zip((*e.down, e.mid), (*control[0], control[1])):
                dst.copy_(src)
        return e.run()

    def _build(self, x, t, text, ctx, control=None, added=None) -> _Entry:
        static_ctx = AdapterContext(kv={n: _clone(kv) for n, kv in ctx.kv.items()},
                                    scale={n: _clone(s) for n, s in ctx.scale.items()},
                                    mask={n: _clone(m) for n, m in ctx.mask.items()})
        e = _Entry(x=x.clone(), t=torch.as_tensor(t, device=x.device).clone(), text=text.clone(), ctx=static_ctx,
                   request=ctx.kv, scales=ctx.scale)
        if control is not None:
            e.down, e.mid = [r.clone() for r in control[0]], control[1].clone()
        if added is not None:
            e.added, e.added_src = {k: v.clone() for k, v in added.items()}, added

        def step():
            extra = {} if e.down is None else dict(down_block_additional_residuals=e.down,
                                                   mid_block_additional_residual=e.mid)
            if e.added is not None:
                extra["added_cond_kwargs"] = e.added
            return self.unet(e.x, e.t, encoder_hidden_states=e.text, return_dict=False,
                             cross_attention_kwargs={"adapter": e.ctx}, **extra)[0]

        if not self.capture:
            e.run = step
            return e
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture: lazy allocations, autotuning, caches
            for _ in range(self.warmup):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()

        def replay():  # (a copy: the graph's output buffer is the next replay's too)
            graph.replay()
            return out.clone()
        e.run = replay
        return e
