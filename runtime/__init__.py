"""Torch-free runtime: load a compressor artifact with numpy and onnxruntime alone.

    from compressor.runtime import load
    model = load("out/minilm")
    model.embed(["hello world"])          # text encoders
    model.embed_images([pil_image])        # vision encoders
    model.run({"input_ids": ..., ...})     # raw feeds at the compiled shapes
    model.generate("The capital of France is", max_new_tokens=20)   # language models
"""

from __future__ import annotations

from pathlib import Path

from .artifact import FORMAT_VERSION, read_manifest
from .errors import FeedError, RuntimeArtifactError
from .lm import CausalLM
from .model import CompiledModel


def load(path: str | Path, providers=None, threads: int | None = None) -> CompiledModel:
    """Verify the manifest and every file hash, then open an onnxruntime session (CPU unless `providers` says).

    Returns a CausalLM (generate, logits, perplexity) for language models, else a CompiledModel (embed...).
    """
    folder = Path(path)
    manifest = read_manifest(folder, verify=True)
    cls = CausalLM if manifest.get("preprocess", {}).get("kind") == "causal_lm" else CompiledModel
    return cls(folder, manifest, providers=providers, threads=threads)


__all__ = ["load", "CompiledModel", "CausalLM", "RuntimeArtifactError", "FeedError", "FORMAT_VERSION", "read_manifest"]
