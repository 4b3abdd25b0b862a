"""`python -m export verify DIR`: every exported graph under ONNX Runtime (CPU) against PyTorch on the same inputs.

The PyTorch side is the engine itself, loaded in float32 from the manifest's sources (paths relative to the
export folder, or absolute in older manifests; `sources` overrides them, as --model/--image-encoder/--adapter
do). For the UNet that is the engine's own cross-attention path (K/V precomputed, `reference` backend), not the
export wrapper, so the check covers the export processors and the plugin node too. unet.onnx runs three
adapter-strength cases: 0 (the base model), 0.5, and a different strength per row. Plugin nodes run through
`export.ort_ops`. An InstructPix2Pix export (manifest kind "edit") loads as engine.EditPipeline: its 8-channel UNet
runs the same cases, and vae_encoder is checked against the VAE encoder's distribution: its mean (the mode, as
EditPipeline.encode_photos takes it) and log-variance (what img2img samples with; an export from before it gives the
mean alone). An inpainting export's 9-channel UNet runs the same cases too.
An export with ControlNets: the UNet runs its cases with random residuals fed to diffusers' UNet, and each
controlnet graph runs two conditioning-scale cases (1, and one per row) against engine.controlnet.residuals on
the net loaded from the manifest's folder (`controlnets`, overridden by --controlnet), every output compared.
"""
from __future__ import annotations

import os

import torch

from ipadapter_instruct.engine.errors import EngineError

from ipadapter_instruct.export.controlnet import controlnet_paths
from ipadapter_instruct.export.graph_spec import Tensor, sample_inputs
from ipadapter_instruct.export.onnx import EDIT_GRAPHS, read_manifest, source_paths

TOLERANCE = {"float32": (1e-4, 1e-4), "float16": (1e-2, 1e-2)}  # (atol, rtol against the output's max)


def load_graph(folder: str, name: str, entry: dict):
    """onnx.load + checker + the graph's inputs/outputs against the manifest; one EngineError for any problem."""
    import onnx

    path = os.path.join(folder, entry["file"])
    if not os.path.isfile(path):
        raise EngineError(f"{path} is missing (the manifest lists it)")
    try:
        onnx.checker.check_model(path)  # by path: works past 2 GB, reads external data beside it
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf DecodeError, checker ValidationError, OSError
        raise EngineError(f"{path}: not a valid ONNX model ({type(e).__name__}: {str(e).strip().splitlines()[0]})") \
            from e
    for kind, declared, listed in (("input", model.graph.input, entry["inputs"]),
                                   ("output", model.graph.output, entry["outputs"])):
        got = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in declared}
        for t in listed:
            if t["name"] not in got:
                raise EngineError(f"{path} has no {kind} {t['name']} (the manifest lists it; the graph has "
                                  f"{', '.join(got)})")
            if len(got[t["name"]]) != len(t["shape"]) or any(
                    isinstance(m, int) and isinstance(g, int) and g != m for g, m in zip(got[t["name"]], t["shape"])):
                raise EngineError(f"{path}: {kind} {t['name']} has shape {got[t['name']]} but the manifest says "
                                  f"{t['shape']}")
    return path


def axis_sizes(manifest: dict, entry: dict, batch=None, height=None, width=None) -> dict[str, int]:
    """The axis sizes to run at: the profile's opt unless given; out-of-profile or misaligned sizes are errors.
    height/width (pixels) set latent_* axes (pixels / VAE factor) and image_* axes (pixels)."""
    f = manifest["vae_scale_factor"]
    sizes = {a: v["opt"] for a, v in entry["axes"].items()}
    asked = {"batch": batch}
    for side, px in (("height", height), ("width", width)):
        for axis, per in ((f"latent_{side}", f), (f"image_{side}", 1)):
            if px is not None and axis in sizes:
                if px <= 0 or px % f:
                    raise EngineError(f"--{side} {px} must be a positive multiple of the VAE factor {f}")
                asked[axis] = px // per
    for axis, v in asked.items():
        if v is None or axis not in sizes:
            continue
        lo, hi = entry["axes"][axis]["min"], entry["axes"][axis]["max"]
        if not lo <= v <= hi:
            raise EngineError(f"{entry['file']}: {axis} = {v} is outside the exported profile [{lo}, {hi}]")
        sizes[axis] = v
    return sizes


def references(pipe, manifest=None):
    """graph name -> f(inputs dict of fp32 tensors) -> PyTorch output (a tuple for several), from the engine's own
    modules; manifest: the export's, for its ControlNet graphs (pipe.controlnets, in its order)."""
    from ipadapter_instruct.engine.attention import AdapterContext, precompute_kv

    cfg = pipe.vae.config
    shift = getattr(cfg, "shift_factor", None) or 0.0
    residual_names = ((manifest or {}).get("graphs", {}).get("unet") or {}).get("controlnet_residuals", [])

    def unet(sample, timestep, encoder_hidden_states, ip_tokens, ip_scale, **residuals):
        kv = precompute_kv(pipe.unet, pipe.cross, encoder_hidden_states, ip_tokens)
        ctx = AdapterContext(kv=kv, scale={n: ip_scale.view(-1, 1, 1, 1) for n in pipe.cross})
        res = [residuals[n] for n in residual_names]
        extra = dict(down_block_additional_residuals=res[:-1], mid_block_additional_residual=res[-1]) if res else {}
        return pipe.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False,
                         cross_attention_kwargs={"adapter": ctx}, **extra)[0]

    def controlnet(net):
        from ipadapter_instruct.engine.controlnet import ControlState, residuals

        def run(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale):
            state = ControlState(images=[controlnet_cond], scales=conditioning_scale[None], starts=[0.0], ends=[1.0],
                                 guess_rows=None, active=[True])
            down, mid = residuals([net], state, sample, timestep, encoder_hidden_states, 0, 1, False)
            return (*down, mid)
        return run

    outputs = ((manifest or {}).get("graphs", {}).get("vae_encoder") or {}).get("outputs") or [{"name": "photo_latent"}]

    def vae_encoder(pixels):  # the outputs the graph has, by name: its mean (mode) and log-variance
        dist = pipe.vae.encode(pixels).latent_dist
        moments = {"photo_latent": dist.mean, "photo_logvar": dist.logvar}
        return tuple(moments[t["name"]] for t in outputs)

    nets = {e["graph"]: controlnet(net) for e, net in zip((manifest or {}).get("controlnets") or [],
                                                          pipe.controlnets)}
    if pipe.kind == "sdxl":  # engine/sdxl.py's encodings and the UNet's added conditioning
        def sdxl_unet(sample, timestep, encoder_hidden_states, ip_tokens, ip_scale, text_embeds, time_ids):
            kv = precompute_kv(pipe.unet, pipe.cross, encoder_hidden_states, ip_tokens)
            ctx = AdapterContext(kv=kv, scale={n: ip_scale.view(-1, 1, 1, 1) for n in pipe.cross})
            return pipe.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False,
                             cross_attention_kwargs={"adapter": ctx},
                             added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})[0]

        def text(encoder, second):
            def run(input_ids):
                out = encoder(input_ids=input_ids, output_hidden_states=True)
                return (out.hidden_states[-2], out.text_embeds) if second else \
                    (out.last_hidden_state, out.hidden_states[-2])
            return run
        nets.update(unet=sdxl_unet, text_encoder=text(pipe.text_encoder, False),
                    text_encoder_2=text(pipe.text_encoder_2, True))
    return {
        "text_encoder": lambda input_ids: pipe.text_encoder(input_ids=input_ids).last_hidden_state,
        "image_encoder": lambda pixel_values: pipe.image_encoder(pixel_values, output_hidden_states=True)
        .hidden_states[-2],
        "projector": lambda **x: pipe.adapter.projector(x["image_tokens"], x.get("instruct_tokens"),
                                                        x.get("prompt_tokens")),
        "unet": unet,
        "vae_decoder": lambda latent: pipe.vae.decode(latent / cfg.scaling_factor + shift, return_dict=False)[0],
        "vae_encoder": vae_encoder,
        **nets,  # (and an SDXL pipeline's text encoders and UNet, in place of the SD1.5 ones)
    }


def scale_cases(b: int, name: str = "ip_scale") -> list[tuple[str, torch.Tensor]]:
    """(label, value of the scale input) per case: ip_scale 0, 0.5 and per row; conditioning_scale 1 and per row."""
    per_row = torch.linspace(0.0, 1.5, b) if b > 1 else torch.tensor([0.7])
    fixed = (0.0, 0.5) if name == "ip_scale" else (1.0,)
    return [(f"{name} {v:g}", torch.full((b,), v)) for v in fixed] + \
        [(f"{name} per row " + "/".join(f"{v:g}" for v in per_row.tolist()), per_row)]


def verify(folder: str, batch=None, height=None, width=None, graphs=None, atol=None, rtol=None, log=print,
           sources=None) -> list:
    """Run every graph; returns rows (graph, case, max_abs_diff, ref_max, ok). Raises EngineError on bad input.
    sources: {"model" | "image_encoder" | "adapter": path} in place of the manifest's (None: the manifest's), and
    "controlnet": a list of folders, one per net of the export."""
    from ipadapter_instruct.engine import EditPipeline, Pipeline

    from ipadapter_instruct.export.ort_ops import session

    manifest = read_manifest(folder)
    src = source_paths(manifest, folder, overrides=sources)  # a moved source fails before anything loads
    nets = controlnet_paths(manifest, folder, (sources or {}).get("controlnet"))
    entries = manifest["graphs"]
    unknown = sorted(set(graphs or ()) - set(entries))
    if unknown:
        raise EngineError(f"{folder} has no graph(s) {', '.join(unknown)}; it has {', '.join(entries)}")
    order = [*EDIT_GRAPHS, *(g for g in entries if g not in EDIT_GRAPHS)]  # the ControlNets' last
    names = [g for g in order if g in entries and (not graphs or g in graphs)]
    paths = {g: load_graph(folder, g, entries[g]) for g in names}  # every file checked before any runs
    sizes = {g: axis_sizes(manifest, entries[g], batch, height, width) for g in names}
    loader = EditPipeline if manifest.get("kind") == "edit" else Pipeline
    pipe = loader.from_pretrained(src["model"], image_encoder=src["image_encoder"], adapter=src["adapter"],
                                  device="cpu", dtype="float32", attention_backend="reference",
                                  **({"controlnet": nets} if nets else {}))
    refs = references(pipe, manifest)
    a_tol, r_tol = TOLERANCE[manifest["dtype"]]
    a_tol, r_tol = atol if atol is not None else a_tol, rtol if rtol is not None else r_tol
    rows = []
    for g in names:
        entry = entries[g]
        sess = session(paths[g], plugin=entry.get("plugin_nodes", 0) > 0)
        inputs = [Tensor(t["name"], t["dtype"], tuple(t["shape"]), t["meaning"], t.get("fill", "normal"))
                  for t in entry["inputs"]]
        feeds = sample_inputs(inputs, sizes[g], pipe.text_encoder.config.vocab_size)
        knob = next((k for k in ("ip_scale", "conditioning_scale") if k in feeds), None)
        cases = scale_cases(sizes[g]["batch"], knob) if knob else [("", None)]
        for case, scale in cases:
            if scale is not None:
                feeds[knob] = scale
            got = [torch.from_numpy(a).float() for a in sess.run(None, {k: v.numpy() for k, v in feeds.items()})]
            with torch.no_grad():
                want = refs[g](**{k: v.float() if v.is_floating_point() else v for k, v in feeds.items()})
            want = [w.float() for w in (want if isinstance(want, (tuple, list)) else (want,))]
            shapes = [tuple(a.shape) for a in got], [tuple(w.shape) for w in want]
            if shapes[0] != shapes[1]:
                raise EngineError(f"{g}: ONNX Runtime returned {shapes[0]}, PyTorch {shapes[1]}")
            diff = max((a - w).abs().max().item() for a, w in zip(got, want))
            top = max(w.abs().max().item() for w in want)
            ok = diff <= a_tol + r_tol * top
            rows.append(dict(graph=g, case=case, max_abs_diff=diff, ref_max=top, ok=ok, shape=list(got[0].shape),
                             outputs=len(got)))
            log(f"{g}{' (' + case + ')' if case else ''}: max |ORT - PyTorch| = {diff:.3g} "
                f"(output max {top:.3g}, shape {list(got[0].shape)}"
                f"{f', {len(got)} outputs' if len(got) > 1 else ''}) {'ok' if ok else 'FAIL'}")
    return rows
