"""ONNX and TensorRT export of the adapter UNet. Not built yet: see the README."""
