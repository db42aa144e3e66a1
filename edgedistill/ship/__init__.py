"""Shipping: ONNX export with parity, the bundle, INT8 (Q/DQ, fake quantization), DeepStream."""
