"""Export and validation: lowering to ONNX, validation against PyTorch, artifacts, benchmarks."""
