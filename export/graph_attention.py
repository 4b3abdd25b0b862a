"""The UNet's adapter cross-attention as ONNX sees it: one plugin node, or the same maths in standard ops.

`--attention plugin` puts one node per cross-attention layer into the graph, spelled as TensorRT's ONNX
parser expects for a registered plugin creator (engine/trt/plugin.py, export/cpp/plugin.cpp): op type = the
plugin's name, a string attribute `plugin_namespace`; the other attributes reach the creator as fields
(num_heads; `aot` = 1, which the creators accept and ignore, so exports made before stay valid). Its inputs are
the tensors right after the projections, packed (B, L, H*D), and the graph input `ip_scale` (B,) fp32:

    DecoupledAttention(q, k, v, k_ip, v_ip, ip_scale; num_heads) -> (B, Lq, H*D)

The node's domain is `ai.onnx.contrib`, where ONNX Runtime's extensions look up Python custom ops, so the
same file runs under ONNX Runtime with `export.ort_ops` registered (TensorRT's parser matches on the op type
and the namespace attribute). `--attention onnx` writes the maths of `kernels.packed_attention_ref` instead.
"""
from __future__ import annotations

import torch

from ipadapter_instruct.engine.attention import SelfAttnProcessor
from ipadapter_instruct.kernels.packed_attention import packed_attention_ref

from ipadapter_instruct.export.plugin import PLUGIN

DOMAIN = "ai.onnx.contrib"
ATTENTION = ("plugin", "onnx")


class PluginAttention(torch.autograd.Function):
    """Computes the reference in PyTorch while tracing; exports as the plugin node."""

    @staticmethod
    def forward(ctx, q, k, v, k_ip, v_ip, ip_scale, heads: int):
        # a view, not ip_scale itself: the tracer would rebind ip_scale to the reference's no-op fp32 cast, and
        # every later layer's plugin node would read a Cast instead of the graph input
        return packed_attention_ref(q, k, v, k_ip, v_ip, ip_scale.view(-1), heads)

    @staticmethod
    def symbolic(g, q, k, v, k_ip, v_ip, ip_scale, heads: int):
        out = g.op(f"{DOMAIN}::{PLUGIN['name']}", q, k, v, k_ip, v_ip, ip_scale,
                   plugin_namespace_s=PLUGIN["namespace"], num_heads_i=heads, aot_i=1)
        return out.setType(q.type())


class ExportSelfAttnProcessor(SelfAttnProcessor):
    """diffusers' SDPA self-attention, accepting (and ignoring) the adapter inputs the cross-attention takes."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 ip_tokens=None, ip_scale=None, *args, **kwargs):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class ExportCrossAttnProcessor:
    """Text + adapter cross-attention on packed tensors; K/V of both token sets computed in the graph."""

    def __init__(self, to_k_ip, to_v_ip, attention: str):
        self.to_k_ip, self.to_v_ip = to_k_ip, to_v_ip
        # "onnx": the reference's standard ops (per-head softmax in fp32 for both branches, scaled sum)
        self.attend = PluginAttention.apply if attention == "plugin" else packed_attention_ref

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 ip_tokens=None, ip_scale=None, *args, **kwargs):
        # hidden_states: (B, Lq, C); encoder_hidden_states: (B, Lt, cross); ip_tokens: (B, Li, cross); ip_scale: (B,)
        residual = hidden_states
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        text = encoder_hidden_states
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        q, k, v = attn.to_q(hidden_states), attn.to_k(text), attn.to_v(text)
        k_ip, v_ip = self.to_k_ip(ip_tokens), self.to_v_ip(ip_tokens)
        out = self.attend(q, k, v, k_ip, v_ip, ip_scale, attn.heads)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_export_processors(unet, adapter_layers, attention: str) -> None:
    """Every attn2 of `unet` gets the export cross-attention with its adapter projections; attn1 plain SDPA."""
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    by_name = adapter_layers.by_name()
    procs = {}
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            layer = by_name[name]
            procs[name] = ExportCrossAttnProcessor(layer["to_k_ip"], layer["to_v_ip"], attention)
        else:
            procs[name] = ExportSelfAttnProcessor()
    unet.set_attn_processor(procs)
