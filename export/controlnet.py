"""ControlNet in the export: one `controlnet` graph per net and the residual inputs of the UNet graph.

    python -m export onnx --model M --image-encoder E --adapter A --controlnet canny/ [--controlnet depth/] --out OUT

The split follows NVIDIA's TensorRT diffusion demo for its SD3.5 ControlNets (a `controlnet` graph with
`controlnet_cond` and `conditioning_scale` inputs, its block samples fed to the denoiser as inputs); for SD1.5 the
demo folds the nets into the UNet graph instead (`images`, `controlnet_scales`), which would tie the UNet graph to
one set of nets and run them on every step. Here the nets stay apart, so a step outside the guidance window or
with every scale 0 skips them and feeds the UNet zeros (engine/exported.py).

Graphs: `controlnet` for the first net, `controlnet_1`, `controlnet_2`, ... for the next ones.
  inputs   sample (batch, C, latent_height, latent_width), timestep (batch,) float32, encoder_hidden_states
           (batch, 77, cross): the text tokens only, as diffusers gives a ControlNet; controlnet_cond
           (batch, 3, image_height, image_width): the control image in [0, 1] at the output size; conditioning_scale
           (batch,) float32: multiplies every residual of the row
  outputs  down_block_res_samples_0..N-1, mid_block_res_sample (diffusers' ControlNetOutput names)
The UNet graph gains down_block_additional_residuals_0..N-1 and mid_block_additional_residual (diffusers' UNet
argument names), the nets' residuals summed. Residual i of SD1.5 is (batch, 320|640|1280, h/d, w/d) with d in
1, 2, 4, 8: the axis names "latent_height/d" (rounded up). Guess mode is a runtime matter: the manifest's
guess_mode_scales (diffusers' logspace from 0.1 to 1, one per residual) times the rows of the prompt branch.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ipadapter_instruct.engine.errors import EngineError

from ipadapter_instruct.export.graph_spec import GraphSpec, Tensor

DOWN_OUT, MID_OUT = "down_block_res_samples", "mid_block_res_sample"
DOWN_IN, MID_IN = "down_block_additional_residuals", "mid_block_additional_residual"


def graph_names(n: int) -> list[str]:
    return ["controlnet"] + [f"controlnet_{i}" for i in range(1, n)]


def residual_layout(config) -> list[tuple[int, int]]:
    """(channels, downscale) per residual of a UNet or ControlNet config: conv_in's, each down block's resnets and
    downsampler, then the mid block's (last)."""
    channels = list(config.block_out_channels)
    layers = config.layers_per_block
    if not isinstance(layers, int):
        raise EngineError(f"layers_per_block {layers!r}: the export takes one count for every block")
    out = [(channels[0], 1)]
    for i, ch in enumerate(channels):
        out += [(ch, 2 ** i)] * layers
        if i < len(channels) - 1:
            out.append((ch, 2 ** (i + 1)))
    return out + [(channels[-1], 2 ** (len(channels) - 1))]


def _residual_tensors(layout, dt: str, names: tuple[str, str], meaning: str) -> list[Tensor]:
    out = []
    for i, (ch, d) in enumerate(layout):
        side = ("latent_height", "latent_width") if d == 1 else (f"latent_height/{d}", f"latent_width/{d}")
        name = f"{names[0]}_{i}" if i < len(layout) - 1 else names[1]
        out.append(Tensor(name, dt, ("batch", ch, *side), meaning))
    return out


def check_nets(pipe) -> list[tuple[int, int]]:
    """The residual layout the nets and the UNet share; a net that pools its conditions or lays its residuals out
    otherwise is an error naming it."""
    want = residual_layout(pipe.unet.config)
    for i, net in enumerate(pipe.controlnets):
        name = getattr(net.config, "_name_or_path", "") or f"ControlNet {i}"
        if net.config.global_pool_conditions:
            raise EngineError(f"the ControlNet {name} pools its conditions (global_pool_conditions, a shuffle net): "
                              "its residuals are (batch, C, 1, 1), which the exported UNet does not take")
        got = residual_layout(net.config)
        if got != want or len(net.controlnet_down_blocks) != len(want) - 1:
            raise EngineError(f"the ControlNet {name} gives {len(got)} residuals (channels, downscale) {got}; the "
                              f"UNet takes {len(want)}: {want}")
    return want


def residual_inputs(pipe, dt: str) -> list[Tensor]:
    """The UNet graph's residual inputs, in diffusers' order (down ones, then mid)."""
    return _residual_tensors(check_nets(pipe), dt, (DOWN_IN, MID_IN),
                             "the ControlNets' residual, summed over the nets (zeros: no ControlNet this step)")


class ControlNet(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale):
        # sample: (B, C, h, w); timestep: (B,); text: (B, 77, cross); controlnet_cond: (B, 3, f*h, f*w) in [0, 1];
        # conditioning_scale: (B,) -> the residuals, each times its row's scale
        down, mid = self.net(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                             controlnet_cond=controlnet_cond, return_dict=False)
        w = conditioning_scale.to(sample.dtype).view(-1, 1, 1, 1)
        return (*(d * w for d in down), mid * w)


def controlnet_specs(pipe, unet: GraphSpec) -> list[GraphSpec]:
    """A spec per net of pipe.controlnets, on the UNet spec's sample, timestep and text inputs, axes and trace."""
    if not pipe.controlnets:
        return []
    dt = unet.inputs[0].dtype
    layout, f = check_nets(pipe), pipe.vae_scale_factor
    image = {a.replace("latent", "image"): tuple(f * v for v in unet.axes[a])
             for a in ("latent_height", "latent_width")}
    trace = {a.replace("latent", "image"): f * v for a, v in unet.trace.items()}
    specs = []
    for name, net in zip(graph_names(len(pipe.controlnets)), pipe.controlnets):
        cond = Tensor("controlnet_cond", dt, ("batch", net.config.conditioning_channels, "image_height",
                                              "image_width"),
                      f"the control image per row, resized to the output size ({f}x the latent), RGB in [0, 1] "
                      "(diffusers' VaeImageProcessor, do_normalize=False)", fill="unit")
        scale = Tensor("conditioning_scale", "float32", ("batch",), "multiplies every residual of the row (the "
                       "request's controlnet_conditioning_scale; 0 outside the guidance window)", fill="scale")
        outputs = _residual_tensors(layout, dt, (DOWN_OUT, MID_OUT), "residual times the row's conditioning_scale")
        specs.append(GraphSpec(name, ControlNet(net), [*unet.inputs[:3], cond, scale], outputs,
                               {**unet.axes, **image}, trace={**unet.trace, **trace}))
    return specs


def manifest_entries(pipe, paths, out: str) -> list[dict]:
    """manifest.json's "controlnets": per net its graph, its folder (relative to `out` when local, as the other
    sources), conditioning channels and guess mode's residual scales."""
    entries = []
    for name, net, path in zip(graph_names(len(paths)), pipe.controlnets, paths):
        path = os.fspath(path)
        local = os.path.exists(path)
        n = len(net.controlnet_down_blocks) + 1
        entries.append({"graph": name, "source": os.path.relpath(os.path.abspath(path), out) if local else path,
                        "relative": local, "conditioning_channels": net.config.conditioning_channels,
                        "guess_mode_scales": torch.logspace(-1, 0, n).tolist()})
    return entries


def controlnet_paths(manifest: dict, folder: str, overrides=None) -> list[str]:
    """The ControlNet folders an export was made from: `overrides` (one per net, in the export's order) or the
    manifest's, relative ones from `folder`."""
    entries = manifest.get("controlnets") or []
    if overrides:
        if len(overrides) != len(entries):
            raise EngineError(f"--controlnet is given {len(overrides)} times; the export has {len(entries)} "
                              "ControlNet(s): give one folder per net, in the export's order")
        return [os.fspath(p) for p in overrides]
    found = []
    for e in entries:
        path = os.path.normpath(os.path.join(folder, e["source"])) if e.get("relative") else e["source"]
        if not os.path.isdir(path):
            raise EngineError(f"the ControlNet of {e['graph']} is not at {path} (moved or deleted): pass --controlnet "
                              "DIR once per net, in the export's order")
        found.append(path)
    return found


def relocated(manifest: dict, onnx_dir: str, out_dir: str) -> list[dict]:
    """The manifest's "controlnets" with local folders relative to `out_dir` (the TensorRT build's manifest copy);
    as they were where the folders are gone."""
    entries = manifest.get("controlnets") or []
    try:
        paths = controlnet_paths(manifest, onnx_dir)
    except EngineError:
        return entries
    return [{**e, "source": os.path.relpath(os.path.abspath(p), out_dir)} if e.get("relative") else e
            for e, p in zip(entries, paths)]
