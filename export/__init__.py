"""Export for TensorRT: the plugin's attention kernels ahead of time (`python -m export plugin`); ONNX and engine builds not yet."""
