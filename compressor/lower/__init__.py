"""Lowering: the captured program to ONNX, onnxruntime's fused ops, 4-bit weights, deployment rewrites."""
