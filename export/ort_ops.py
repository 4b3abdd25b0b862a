"""The plugin op for ONNX Runtime: `DecoupledAttention` as a Python custom op through onnxruntime-extensions.

    from ipadapter_instruct.export.ort_ops import session
    sess = session("out/unet.onnx")           # plugin nodes run `kernels.packed_attention_ref`

This is how `python -m export verify` runs unet.onnx exported with `--attention plugin` on the CPU: the
custom op computes exactly the reference the Triton kernel is tested against. It is a verification path
(the Python op copies its output through lists), not a fast one; graphs exported with `--attention onnx`
need no custom op at all.
"""
from __future__ import annotations

from ipadapter_instruct.engine.errors import EngineError

from ipadapter_instruct.export.plugin import PLUGIN

_REGISTERED = False


def _missing(e: ImportError) -> EngineError:
    return EngineError(f"ONNX Runtime with its extensions is needed here ({e}): pip install "
                       "'ipadapter-instruct-engine[export]' (onnx, onnxruntime, onnxruntime-extensions)")


def register() -> None:
    """Register the plugin op (float32 and float16 forms) with onnxruntime-extensions, once per process."""
    global _REGISTERED
    if _REGISTERED:
        return
    try:
        from onnxruntime_extensions import PyCustomOpDef, onnx_op
    except ImportError as e:
        raise _missing(e) from e
    f32, f16 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_float16
    attrs = {"plugin_namespace": PyCustomOpDef.dt_string, "num_heads": PyCustomOpDef.dt_int64,
             "aot": PyCustomOpDef.dt_int64}
    for dt in (f32, f16):  # ip_scale is float32 in both
        onnx_op(op_type=PLUGIN["name"], inputs=[dt] * 5 + [f32], outputs=[dt], attrs=attrs)(_decoupled_attention)
    _REGISTERED = True


def _decoupled_attention(q, k, v, k_ip, v_ip, ip_scale, plugin_namespace="", num_heads=0, aot=0):
    # numpy in, numpy out; the reference computes its softmaxes in fp32 whatever the dtype
    import torch

    from ipadapter_instruct.kernels.packed_attention import packed_attention_ref

    if plugin_namespace != PLUGIN["namespace"]:
        raise RuntimeError(f"{PLUGIN['name']} node has plugin_namespace {plugin_namespace!r}, "
                           f"expected {PLUGIN['namespace']!r}")
    args = [torch.from_numpy(x) for x in (q, k, v, k_ip, v_ip, ip_scale)]
    return packed_attention_ref(*args, int(num_heads)).numpy()


def session(path: str, plugin: bool = True):
    """An ONNX Runtime CPU session for `path`, with the plugin op registered when `plugin` is set."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise _missing(e) from e
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if plugin:
        register()
        from onnxruntime_extensions import get_library_path
        opts.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
