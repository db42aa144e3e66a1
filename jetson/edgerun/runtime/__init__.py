"""Running a model: ONNX Runtime and TensorRT runners, engine builds, sealed engine records."""
