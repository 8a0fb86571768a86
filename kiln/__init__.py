"""Kiln: PyTorch detectors to validated ONNX variants and TensorRT engines, per device and precision."""

__version__ = "0.1.0"
