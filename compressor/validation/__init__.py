"""Validation: the artifact that ships against the PyTorch program, on held-out data."""
