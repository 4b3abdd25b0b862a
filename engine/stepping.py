"""Step-level (continuous) batching: requests at different steps share each UNet call.

A `Flight` is one request in progress: what `Pipeline._prepare` computed for it once (its plan, text rows, K/V,
per-row scales and masks per step, its own scheduler object with its timesteps, its generator) plus its latents
and step index. `step(pipe, flights)` packs the running flights into one UNet batch (rows concatenated, one
timestep per row, which diffusers' UNet takes as a (rows,) tensor), then combines each flight's rows by its own
guidance weights and steps it with its own scheduler. Flights join and leave between any two steps:

    queue --admit (text, image, projector, K/V: once)--> running set --step--> ... --last step--> decode --> done
                                                         \\___ one UNet call per step for every running flight

A flight's latents equal those of the same request run alone (tests/test_stepping.py), whatever joins or leaves.
On SDXL a flight also holds its added conditioning (pooled embeddings and time ids per row), packed beside its text
rows, so flights of different size conditioning share a step (tests/test_sdxl.py). An InstructPix2Pix edit's flight
holds its photo latent per row (engine.edit.EditContext), encoded once at admission (tests/test_edit.py). With a
ControlNet a flight keeps its control images, scales, window and guess mode; each step runs the net once over the
rows it acts on at their own flights' steps (tests/test_controlnet.py).
The packed inputs are cached while the running set (and each flight's per-step adapter context) stays the same,
so a steady batch copies nothing per step but the latents. With CUDA graphs (`Pipeline.enable_cuda_graphs`) the
rows are padded to a bucket (1, 2, 4, 8, ...) so one capture serves every running set of that size; padded rows
never reach a result.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace

import torch

from ipadapter_instruct.engine.attention import AdapterContext
from ipadapter_instruct.engine.combine import NonFinite, finite_images
from ipadapter_instruct.engine.controlnet import ControlState, active_nets, in_window, net_residuals, summed
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.prepared import (SIZE_CONDITIONING, CallState, EditContext, Prepared, select_rows,
                                                size_conditioning, with_channels)


@dataclass(eq=False)
class Flight:
    prep: Prepared                # what Pipeline.prepare made for this one request
    latents: torch.Tensor
    output_type: str = "pil"
    progress: object = None       # progress(step, total) after each of its steps
    index: int = 0                # steps done
    timings: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    seeds: list = field(default_factory=list)  # per image: the seed that gives it back (engine/results.py)

    @property
    def total(self) -> int:
        return self.prep.total

    @property
    def done(self) -> bool:
        return self.index >= self.prep.total

    @property
    def rows(self) -> int:
        return int(self.prep.latent_of_row.numel())

    @property
    def size(self) -> tuple[int, int]:
        return self.prep.height, self.prep.width


def start(pipe, **kwargs) -> Flight:
    """Admit one request (the keyword arguments of `Pipeline.__call__`, one value each): its step-invariant work
    runs now, once. -> a Flight at step 0."""
    flights = _admit(pipe, kwargs, one=True)
    return flights[0]


def start_many(pipe, **kwargs) -> list[Flight]:
    """Admit several requests of one step count, scheduler and image size at once (per-request lists, as
    `Pipeline.__call__` takes them): their text, image, projector and K/V work runs as one batch, then each
    request becomes its own flight (its rows, latents, guidance weights and a scheduler of its own), the same as
    `start` would have made it alone. -> one Flight per request, in order."""
    return _admit(pipe, kwargs, one=False)


def _admit(pipe, kwargs: dict, one: bool) -> list[Flight]:
    caps = pipe.capabilities
    if not caps.step_batching:
        raise EngineError("step-level batching runs on the PyTorch backend (not exported graphs)")
    kwargs = dict(kwargs)
    call = CallState()
    if caps.size_conditioning:  # SDXL: this admission's size conditioning (one for the requests admitted together)
        call.size_conditioning = size_conditioning(**{k: kwargs.pop(k) for k in SIZE_CONDITIONING if k in kwargs})
    args = pipe.call_defaults()
    unknown = sorted(set(kwargs) - set(args))
    if unknown:
        raise EngineError(f"unknown argument(s) for a request: {', '.join(unknown)}")
    args.update(kwargs)
    reqs = pipe.parse(args)
    if one and len(reqs) != 1:
        raise EngineError(f"a flight is one request; got {len(reqs)} (give single values, not lists, or use "
                          "start_many)")
    t0 = time.perf_counter()
    prep = pipe.prepare(reqs, args, call)
    timings = dict(call.timings, prepare_ms=(time.perf_counter() - t0) * 1e3)
    preps = [prep] if len(reqs) == 1 else _split(pipe, prep, reqs)
    progress = args["progress_callback"]  # one for every flight, or a list of one per request
    callbacks = list(progress) if isinstance(progress, (list, tuple)) else [progress] * len(preps)
    if len(callbacks) != len(preps):
        raise EngineError(f"{len(preps)} requests but {len(callbacks)} progress callbacks")
    return [Flight(p, p.latents, args["output_type"], cb, timings=dict(timings), seeds=list(r.seeds))
            for p, cb, r in zip(preps, callbacks, reqs)]


def _split(pipe, prep, reqs) -> list:
    """One request's share of a batch's `_prepare`: its UNet rows (text, K/V, scales, masks of every step's context,
    the identity of repeated contexts kept), its latents, its share of the guidance combination, and a copy of the
    scheduler with its own generator for ancestral steps."""
    owner = torch.tensor(prep.plan["row_request"], device=prep.text_rows.device)
    offsets = [0]
    for req in reqs:
        offsets.append(offsets[-1] + req.num_images)
    out = []
    for r, req in enumerate(reqs):
        rows = (owner == r).nonzero().flatten()
        lat = torch.arange(offsets[r], offsets[r + 1], device=prep.latents.device)
        made: dict = {}

        def context(c):
            if id(c) not in made:
                if isinstance(c, EditContext):  # InstructPix2Pix: the adapter's part, and the photo latent per row
                    made[id(c)] = EditContext(context(c.adapter), c.image_rows.index_select(0, rows))
                else:
                    made[id(c)] = AdapterContext(kv={n: select_rows(v, rows) for n, v in c.kv.items()},
                                                 scale={n: select_rows(v, rows) for n, v in c.scale.items()},
                                                 mask={n: select_rows(v, rows) for n, v in c.mask.items()})
            return made[id(c)]
        sched = copy.deepcopy(prep.sched)
        out.append(replace(
            prep, plan=None, text_rows=prep.text_rows.index_select(0, rows),
            control=_split_control(prep.control, rows),
            added=None if prep.added is None else {k: select_rows(v, rows) for k, v in prep.added.items()},
            sched=sched, latents=prep.latents.index_select(0, lat),
            keep=None if prep.keep is None else prep.keep.select(lat),
            latent_of_row=prep.latent_of_row.index_select(0, rows) - offsets[r],
            combine=prep.combine.select(lat, rows),
            extra=pipe.step_kwargs(sched, [req]), contexts=[context(c) for c in prep.contexts]))
    return out


def _split_control(state, rows):
    """One request's share of a batch's ControlState: its rows' control images, scales and guess-mode flags."""
    if state is None:
        return None
    scales = state.scales.index_select(1, rows.to(state.scales.device))
    guess = None if state.guess_rows is None else state.guess_rows.index_select(0, rows.to(state.guess_rows.device))
    return ControlState([im.index_select(0, rows.to(im.device)) for im in state.images], scales, state.starts,
                        state.ends, guess, active_nets(scales, guess))


def _control(pipe, flights, x, t, text, added):
    """The ControlNet residuals of a packed step: for each net, one call over the packed rows per guess mode, each
    flight's rows weighted by its scale where the net acts at that flight's own step, zero elsewhere; None when no
    net acts on any flight (decided on the host: no device sync per step)."""

    rows = x.shape[0]
    extra = None if added is None else {k: v[:rows] for k, v in added.items()}
    out = None
    for guess in (False, True):
        for k, net in enumerate(pipe.controlnets):
            on = [f.prep.guess_mode is guess and f.prep.control.active[k]
                  and in_window(f.prep.control.starts[k], f.prep.control.ends[k], f.index, f.total) for f in flights]
            if not any(on):
                continue
            weight = []
            for f, acts in zip(flights, on):
                c = f.prep.control
                w = c.scales[k] * (c.guess_rows if c.guess_rows is not None else 1.0)
                weight.append(w if acts else torch.zeros_like(w))
            images = torch.cat([f.prep.control.images[k] for f in flights])
            out = summed(out, net_residuals(net, x, t, text[:rows], images, torch.cat(weight), guess, extra))
    return out


def _cat(parts):
    # per-flight context entries -> one: tensors concatenated along rows, tuples entry by entry, None stays None
    first = parts[0]
    if isinstance(first, tuple):
        return tuple(_cat([p[i] for p in parts]) for i in range(len(first)))
    return None if first is None else torch.cat(parts)


def _masks(flights, contexts, name):
    # a flight without masks acts everywhere: ones of its rows for every adapter
    like = next(c.mask[name] for c in contexts if name in c.mask)
    return tuple(torch.cat([c.mask[name][a] if name in c.mask else
                            torch.ones(f.rows, like[a].shape[1], device=like[a].device, dtype=like[a].dtype)
                            for f, c in zip(flights, contexts)]) for a in range(len(like)))


class Packer:
    """The packed text rows and adapter context of a running set, rebuilt only when the set (or a flight's per-step
    context, at an adapter step-range boundary) changes."""

    def __init__(self):
        self.flights: tuple = ()
        self.contexts: tuple = ()
        self.value = None

    def __call__(self, flights, pad_to: int = 0):
        contexts = tuple(f.prep.contexts[f.index] for f in flights)
        same = len(flights) == len(self.flights) and all(a is b for a, b in zip(flights, self.flights)) \
            and all(a is b for a, b in zip(contexts, self.contexts))
        if same and self.value is not None and self.value[3] == pad_to:
            return self.value[:3]
        text = torch.cat([f.prep.text_rows for f in flights])
        edit = isinstance(contexts[0], EditContext)  # InstructPix2Pix: pack the adapter parts, and the photo rows
        adapters = [c.adapter for c in contexts] if edit else list(contexts)
        names = list(adapters[0].kv)
        masked = {n for c in adapters for n in c.mask}
        ctx = AdapterContext(kv={n: _cat([c.kv[n] for c in adapters]) for n in names},
                             scale={n: _cat([c.scale[n] for c in adapters]) for n in names},
                             mask={n: _masks(flights, adapters, n) for n in masked})
        first = flights[0].prep.added  # SDXL: text_embeds and time_ids per row
        added = None if first is None else {k: torch.cat([f.prep.added[k] for f in flights]) for k in first}
        photo = torch.cat([c.image_rows for c in contexts]) if edit else None
        if pad_to > text.shape[0]:
            text, ctx = _pad(text, ctx, pad_to)
            added = None if added is None else {k: _pad_rows(v, pad_to) for k, v in added.items()}
            photo = None if photo is None else _pad_rows(photo, pad_to)
        if edit:
            ctx = EditContext(ctx, photo)
        self.flights, self.contexts, self.value = tuple(flights), contexts, (text, ctx, added, pad_to)
        return text, ctx, added


def _pad_rows(t, n):
    # repeat the last row up to n rows (a padded row's output is thrown away; it only has to be finite)
    if isinstance(t, tuple):
        return tuple(_pad_rows(x, n) for x in t)
    if t is None:
        return None
    return torch.cat([t, t[-1:].expand(n - t.shape[0], *t.shape[1:])])


def _pad(text, ctx, n):
    return _pad_rows(text, n), AdapterContext(kv={k: _pad_rows(v, n) for k, v in ctx.kv.items()},
                                              scale={k: _pad_rows(v, n) for k, v in ctx.scale.items()},
                                              mask={k: _pad_rows(v, n) for k, v in ctx.mask.items()})


def _pad_zeros(t, n):
    return torch.cat([t, t.new_zeros(n - t.shape[0], *t.shape[1:])])


def bucket(rows: int) -> int:
    """The CUDA-graph row bucket: the next power of two."""
    return 1 << (rows - 1).bit_length()


def step(pipe, flights: list[Flight], packer: Packer | None = None) -> None:
    """One denoising step for every flight in one UNet call (flights of one image size, none done)."""
    if not flights:
        return
    if len({f.size for f in flights}) > 1:
        raise EngineError(f"flights of one step must share an image size, got {sorted({f.size for f in flights})}")
    if any(f.done for f in flights):
        raise EngineError("a flight that has finished its steps cannot step again")
    xs, ts = [], []
    for f in flights:
        t = f.prep.timesteps[f.index]
        x = f.prep.sched.scale_model_input(f.latents.index_select(0, f.prep.latent_of_row), t)
        xs.append(x)
        # one timestep per row; float32 for every scheduler (the UNet's time embedding takes timesteps.float())
        ts.append(torch.as_tensor(t, device=x.device).float().reshape(1).expand(x.shape[0]))
    x, t = torch.cat(xs), torch.cat(ts)
    rows = x.shape[0]
    pad = bucket(rows) if pipe.uses_cuda_graphs else 0
    text, ctx, added = (packer or Packer())(flights, pad)
    res = None
    if pipe.controlnets:
        with torch.profiler.record_function("engine::controlnet"):
            res = _control(pipe, flights, x, t, text, added)
    if pad > rows:
        x = torch.cat([x, x.new_zeros(pad - rows, *x.shape[1:])])
        t = torch.cat([t, t[-1:].expand(pad - rows)])
        if res is not None:  # padded rows get no residual
            res = ([_pad_zeros(r, pad) for r in res[0]], _pad_zeros(res[1], pad))
    with torch.profiler.record_function("engine::unet_step"):
        x, ctx = with_channels(x, ctx)  # (an edit's photo latent, an inpainting UNet's mask: beside the latents)
        eps_rows = pipe.unet_step(x, t, text, ctx, res, added)
    offset = 0
    for f in flights:
        e = eps_rows[offset:offset + f.rows]
        offset += f.rows
        f.latents = f.prep.update(e, f.prep.timesteps[f.index], f.latents)
        f.index += 1
        if f.progress is not None:
            f.progress(f.index, f.total)


def finish(pipe, flight: Flight):
    """A finished flight's output: PIL images, or its latents with output_type="latent"."""
    return finish_many(pipe, [flight])[0]


def finish_many(pipe, flights: list[Flight]) -> list:
    """Finished flights' outputs (as `finish`), their images decoded in one VAE call per image size. A flight whose
    latents are not finite fails alone: NonFinite names it (its index in `flights`) and carries the others' outputs
    (None for it)."""
    for f in flights:
        if not f.done:
            raise EngineError(f"the flight is at step {f.index} of {f.total}: not finished")
    ok = [all(finite_images(f.latents)) for f in flights]
    out: dict = {}
    groups: dict = {}
    for k, f in enumerate(flights):
        if f.output_type == "latent":
            out[k] = f.latents
        else:
            groups.setdefault(f.size, []).append(k)
    for ks in groups.values():
        t0 = time.perf_counter()  # (a failed flight decodes as zeros, then is dropped)
        images = pipe.decode(torch.cat([flights[k].latents if ok[k] else torch.zeros_like(flights[k].latents)
                                        for k in ks]))
        decode_ms = (time.perf_counter() - t0) * 1e3
        at = 0
        for k in ks:
            n = flights[k].latents.shape[0]
            out[k], at = images[at:at + n], at + n
            flights[k].timings["vae_decode_ms"] = decode_ms
    now = time.perf_counter()
    for f in flights:
        f.timings["total_ms"] = (now - f.started) * 1e3
    if not all(ok):
        raise NonFinite([k for k in range(len(flights)) if not ok[k]],
                        [out[k] if ok[k] else None for k in range(len(flights))])
    return [out[k] for k in range(len(flights))]


class SteppingMixin:
    """A pipeline's step-level batching methods (the functions above, on the pipeline)."""

    def start(self, **kwargs):
        """Admit one request (the keyword arguments of a call, one value each) for step-level batching: its
        step-invariant work runs now. -> an engine.stepping.Flight; `step([flights])` advances several flights of one
        image size, at any steps, by one step in one UNet call; `finish(flight)` decodes a finished one."""
        return start(self, **kwargs)

    def start_many(self, **kwargs) -> list:
        """Admit several requests of one step count, scheduler and size at once (per-request lists, as a call takes
        them): one batch of text, image and projector work, then one flight per request."""
        return start_many(self, **kwargs)

    def step(self, flights: list, packer=None) -> None:
        """One denoising step for every flight in one UNet call. packer (engine.stepping.Packer): keeps the packed
        inputs of a steady running set between steps; each caller (the server's stepper) holds its own."""
        step(self, flights, packer)

    def finish(self, flight):
        return finish(self, flight)

    def finish_many(self, flights: list) -> list:
        """Finished flights' outputs, decoded in one VAE call per image size."""
        return finish_many(self, flights)
