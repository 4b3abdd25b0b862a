"""`python -m export onnx`: text_encoder, image_encoder, projector, unet and vae_decoder as ONNX, plus manifest.json.

An InstructPix2Pix model (its UNet takes twice the VAE's latent channels) is loaded as `engine.EditPipeline` and
exports vae_encoder too; its manifest says `"kind": "edit"` (a text-to-image model's: "text_to_image"). An inpainting
model (a 9-channel UNet: latents, mask, masked-photo latent; kind "text_to_image", the UNet graph's "channels" say
which is which) always exports vae_encoder, since it cannot run without a photo; any other model exports it with
`img2img=True` (`--img2img`), which the runtimes need to start from a photo (img2img, 4-channel inpainting). It is
not exported by default there: it adds the VAE encoder's weights and a TensorRT plan that text-to-image never runs.
With `controlnet=` (diffusers ControlNetModel folders) a text-to-image export adds a controlnet graph per net, the
UNet graph takes their residuals, and the manifest lists the nets under "controlnets" (export/controlnet.py).

The graphs are traced from the same modules the engine runs (loaded by `engine.Pipeline.from_pretrained`),
with the UNet's adapter cross-attentions as plugin nodes or standard ops (graph_attention.py). Everything is
written into a staging folder beside OUT and moved into OUT only when every graph exported and passed
onnx.checker, so a failed export leaves nothing half-written behind.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings

import torch

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.exported import FORMAT, GRAPHS, SOURCES, read_manifest, source_paths  # noqa: F401 (export API)
from ipadapter_instruct.engine.graph_names import DEFAULT_OPSET, EDIT_GRAPHS
from ipadapter_instruct.engine.interrupt import forget, remove_if_killed

from ipadapter_instruct.export.controlnet import graph_names, manifest_entries
from ipadapter_instruct.export.graph_attention import ATTENTION, DOMAIN
from ipadapter_instruct.export.plugin import PLUGIN
from ipadapter_instruct.export.specs import build_specs

SDXL_GRAPHS = GRAPHS + ("text_encoder_2",)  # an SDXL export's: the second text encoder (tokens and pooled)
KINDS = {"text_to_image": GRAPHS, "edit": EDIT_GRAPHS, "sdxl": SDXL_GRAPHS}  # manifest "kind" -> its graphs


def model_kind(model) -> str:
    """"edit" for an InstructPix2Pix folder (engine.loading.is_edit_model), "sdxl" for an SDXL folder (a second
    text encoder and tokenizer), else "text_to_image"; a folder whose configs do not read is left to the pipeline's
    loader to name what is wrong."""
    from ipadapter_instruct.engine.loading import is_edit_model, is_sdxl_folder

    if os.path.isdir(os.fspath(model)) and is_sdxl_folder(os.fspath(model)):
        return "sdxl"
    return "edit" if is_edit_model(model) else "text_to_image"


def _tensor_entry(t) -> dict:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "meaning": t.meaning, "fill": t.fill}


def source_entry(out: str, **paths) -> dict:
    """The manifest's `source`: local paths relative to the export folder `out` (listed under `relative`), so the
    export and the weights can move together; anything else (a hub id) as given."""
    entry, relative = {}, []
    for name, path in paths.items():
        path = os.fspath(path)
        if os.path.exists(path):
            path = os.path.relpath(os.path.abspath(path), out)
            relative.append(name)
        entry[name] = path
    return {**entry, "relative": relative}


def export_graph(spec, path: str, opset: int) -> None:
    """Trace one spec at its trace sizes (`GraphSpec.trace_sizes`: opt batch, small spatial sizes; the axes stay
    dynamic) and write it to `path`; weights past ONNX's 2 GB limit go to one file beside it, `<name>.onnx.data`
    (the exporter would scatter them over hundreds of files, shared by every graph)."""
    sample = spec.sample(spec.trace_sizes())
    device = next(spec.module.parameters()).device
    args = tuple(sample[t.name].to(device) for t in spec.inputs)
    scratch = f"{path}.parts"
    os.makedirs(scratch)
    raw = os.path.join(scratch, os.path.basename(path))
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
            torch.onnx.export(spec.module, args, raw, input_names=[t.name for t in spec.inputs],
                              output_names=[t.name for t in spec.outputs], dynamic_axes=spec.dynamic_axes(),
                              opset_version=opset, do_constant_folding=True, dynamo=False)
        if os.listdir(scratch) == [os.path.basename(raw)]:
            os.replace(raw, path)
        else:
            gather_external_data(raw, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def gather_external_data(src: str, dst: str) -> None:
    """Rewrite the model at `src` (weights in any number of external files) as `dst` + `dst`.data."""
    import onnx

    model = onnx.load(src)
    onnx.save_model(model, dst, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(dst) + ".data", size_threshold=1024)
    os.chmod(dst + ".data", 0o644)  # onnx creates it private; the graph beside it is world-readable


def check_graph(path: str) -> dict:
    """onnx.checker with strict type and shape inference on the file; returns op counts (plugin nodes among them)."""
    import onnx

    onnx.checker.check_model(path, full_check=True)  # by path: works past 2 GB
    model = onnx.load(path, load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return counts


def _remove_stale_stages(out: str) -> None:
    """Staging folders of exports into `out` whose process is gone (killed before its cleanup ran)."""
    import glob

    for path in glob.glob(glob.escape(out) + ".partial-*"):
        pid = path.rsplit("-", 1)[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def _check_options(attention: str, dtype: str, opset: int) -> None:
    if attention not in ATTENTION:
        raise EngineError(f"--attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
    if dtype not in ("float32", "float16"):
        raise EngineError(f"--dtype must be float32 or float16, got {dtype!r}")
    if not 14 <= opset <= 21:
        raise EngineError(f"--opset must be between 14 and 21 (scaled dot-product attention needs 14), got {opset}")


def inpainting_model(model) -> bool:
    """Whether a local model folder or file has an inpainting UNet (latents + mask + masked-photo latent); False
    where its configs do not read (a hub id: the loaded UNet says, `specs.encodes_photos`)."""
    from ipadapter_instruct.engine.loading import read_configs

    configs = read_configs(model)
    return configs is not None and configs[0].get("in_channels") == 2 * configs[1].get("latent_channels", 4) + 1


def _chosen_graphs(kind: str, nets: list, graphs, encoder: bool = False) -> tuple[str, ...]:
    """The graphs to export: `graphs`, or every graph of the model's kind and its nets (and vae_encoder where
    `encoder`); an unknown one is an error."""
    if nets and kind in ("edit", "sdxl"):
        what = "InstructPix2Pix" if kind == "edit" else "SDXL"
        raise EngineError(f"exporting a ControlNet with {what} is not built (it runs on the PyTorch backend): export "
                          "the model without --controlnet")
    known = KINDS[kind] + tuple(graph_names(len(nets)) if nets else ())
    if encoder and "vae_encoder" not in known:
        known += ("vae_encoder",)
    graphs = tuple(graphs or known)
    unknown = sorted(set(graphs) - set(known))
    if unknown:
        what = {"edit": "an InstructPix2Pix", "sdxl": "an SDXL"}.get(kind, "a text-to-image")
        hint = " (add --img2img to export vae_encoder)" if "vae_encoder" in unknown else ""
        raise EngineError(f"unknown graph(s) {', '.join(unknown)} for {what} model"
                          f"{f' with {len(nets)} ControlNet(s)' if nets else ''}; choose from {', '.join(known)}"
                          f"{hint}")
    return graphs


def _manifest(pipe, kind: str, opset: int, dtype: str, attention: str, out: str, sources: dict, nets: list) -> dict:
    """manifest.json without its graphs: the format, the plugin's contract, the weights, what a runtime needs."""
    manifest = {"format": FORMAT, "kind": kind, "opset": opset, "dtype": dtype, "attention": attention,
                "plugin": {**PLUGIN, "domain": DOMAIN, "op_type": PLUGIN["name"],
                           "inputs": ["q", "k", "v", "k_ip", "v_ip", "ip_scale"],
                           "attributes": {"plugin_namespace": PLUGIN["namespace"], "num_heads": "int", "aot": 1},
                           "layout": "packed (B, L, heads*head_dim); ip_scale (B,) float32"},
                "source": {**source_entry(out, **sources), "adapter_kind": pipe.adapter.kind},
                "vae_scale_factor": pipe.vae_scale_factor, "vae_scaling_factor": pipe.vae.config.scaling_factor,
                "tokenizer": {"folder": "tokenizer/ of the model", "max_length": pipe.tokenizer.model_max_length},
                "graphs": {}}
    if kind == "sdxl":  # what a runtime needs beside the graphs (engine/sdxl.py computes the same)
        manifest["tokenizer_2"] = {"folder": "tokenizer_2/ of the model",
                                   "max_length": pipe.tokenizer_2.model_max_length}
        manifest["sdxl"] = {
            "encoder_hidden_states": "concat(text_encoder penultimate, text_encoder_2 penultimate), last axis",
            "text_embeds": "text_encoder_2 pooled: the prompt's, the negative prompt's in unconditional rows",
            "time_ids": "original_size + crops_coords_top_left + target_size per row, (h, w, top, left, h, w)",
            "projector_text": "text_encoder text_tokens (last hidden state)"}
    if nets:
        manifest["controlnets"] = manifest_entries(pipe, nets, out)
    return manifest


def _export_to_stage(spec, stage: str, opset: int, log) -> dict:
    """Export and check one graph into `stage`; returns its manifest entry."""
    t0 = time.perf_counter()
    path = os.path.join(stage, f"{spec.name}.onnx")
    try:
        export_graph(spec, path, opset)
        counts = check_graph(path)
    except EngineError:
        raise
    except Exception as e:  # the exporter and the checker raise many types
        raise EngineError(f"exporting {spec.name} failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    plugins = counts.get(f"{DOMAIN}::{PLUGIN['name']}", 0)
    data = f"{spec.name}.onnx.data"
    log(f"{spec.name}.onnx: {sum(counts.values())} nodes"
        + (f", {plugins} {PLUGIN['name']} plugin nodes" if plugins else "")
        + f" ({time.perf_counter() - t0:.1f} s)")
    return {"file": f"{spec.name}.onnx", "external_data": data if os.path.exists(os.path.join(stage, data)) else None,
            "inputs": [_tensor_entry(t) for t in spec.inputs],
            "outputs": [_tensor_entry(t) for t in spec.outputs], "dynamic_axes": spec.dynamic_axes(),
            "axes": {a: dict(zip(("min", "opt", "max"), v)) for a, v in spec.axes.items()},
            "profiles": spec.profiles(), "plugin_nodes": plugins, "nodes": sum(counts.values()), **spec.notes,
            **({"vocab": spec.vocab} if spec.vocab else {})}


def _publish(stage: str, out: str, manifest: dict) -> None:
    """The staged graphs and manifest.json into `out`, replacing an earlier export's files of the same graphs."""
    with open(os.path.join(stage, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    os.makedirs(out, exist_ok=True)
    for name, entry in manifest["graphs"].items():  # a graph that now fits in its .onnx: no earlier weights beside it
        old = os.path.join(out, f"{name}.onnx.data")
        if entry["external_data"] is None and os.path.exists(old):
            os.remove(old)
    for name in os.listdir(stage):
        os.replace(os.path.join(stage, name), os.path.join(out, name))


def export_onnx(model, image_encoder, adapter, out: str, opset: int = DEFAULT_OPSET, attention: str = "plugin",
                dtype: str = "float32", graphs=None, device=None, log=print, controlnet=None,
                img2img: bool = False) -> str:
    """Export the graphs (default: all of the model's kind, and the nets' controlnet graphs) of one base model +
    image encoder + adapter (+ ControlNet folders: one path or a list) into `out`; returns manifest.json's path.
    img2img: export vae_encoder for any model (an InstructPix2Pix or inpainting model always has it)."""
    from ipadapter_instruct.engine import EditPipeline, Pipeline  # deferred: the pipeline is heavy and `python -m export` imports this

    _check_options(attention, dtype, opset)
    kind = model_kind(model)
    nets = [] if controlnet is None else [controlnet] if isinstance(controlnet, (str, os.PathLike)) \
        else list(controlnet)
    chosen = _chosen_graphs(kind, nets, graphs, img2img or inpainting_model(model))
    if os.path.exists(out) and not os.path.isdir(out):
        raise EngineError(f"--out {out} exists and is not a folder")
    if adapter is None:
        raise EngineError("export needs an adapter file (--adapter): the UNet graph takes adapter tokens")
    t0 = time.perf_counter()
    # traced where it runs fastest: a CUDA GPU when there is one (fp16 convolutions on a CPU are slow; tracing on
    # CUDA runs in the GPU stage of the tests, not yet run)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loader = EditPipeline if kind == "edit" else Pipeline
    pipe = loader.from_pretrained(model, image_encoder=image_encoder, adapter=adapter, device=device, dtype=dtype,
                                  attention_backend="reference", **({"controlnet": nets} if nets else {}))
    specs = build_specs(pipe, attention, img2img)  # (all of them by default: vae_encoder where the UNet needs it)
    specs = [s for s in specs if s.name in chosen] if graphs else specs
    log(f"loaded in {time.perf_counter() - t0:.1f} s")
    out = os.path.abspath(out)
    _remove_stale_stages(out)
    stage = f"{out}.partial-{os.getpid()}"
    remove_if_killed(stage)  # (Ctrl-C during one long C call ends the process: engine/interrupt.py)
    os.makedirs(stage)
    try:
        manifest = _manifest(pipe, kind, opset, dtype, attention, out,
                             dict(model=model, image_encoder=image_encoder, adapter=adapter), nets)
        for spec in specs:
            manifest["graphs"][spec.name] = _export_to_stage(spec, stage, opset, log)
        _publish(stage, out, manifest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        forget(stage)
    return os.path.join(out, "manifest.json")
