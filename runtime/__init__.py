"""Torch-free runtime: load a compressor artifact with numpy and onnxruntime alone.

    from compressor.runtime import load
    model = load("out/minilm")
    model.embed(["hello world"])          # text encoders
    model.embed_images([pil_image])        # vision encoders
    model.run({"input_ids": ..., ...})     # raw feeds at the compiled shapes
    model.generate("The capital of France is", max_new_tokens=20)   # language models
    model.transcribe(waveform)             # speech (Whisper): float32 16 kHz mono numpy array -> text
    load("out/minilm", providers=["cuda"])                          # GPU, with onnxruntime-gpu installed
    load("out/minilm", verify_key="build.pub")                      # only an artifact signed with that key

load() is the strict part: the manifest is checked against its schema, every file in the folder must be listed in it
with a matching SHA-256, nothing may lead out of the folder (docs/artifact-trust.md).
"""

from __future__ import annotations

import os
from pathlib import Path

from .artifact import FORMAT_VERSION, read_manifest
from .errors import (ArtifactKindError, FeedError, FeedTypeError, ProviderError, RuntimeArtifactError,
                     RuntimeUsageError)
from .lm import CausalLM
from .model import CompiledModel, TruncationWarning, check_threads
from .providers import resolve_providers
from .speech import SpeechModel


def load(path: str | Path, providers=None, threads: int | None = None, allow_fallback: bool = False,
         verify_key=None) -> CompiledModel:
    """Verify the manifest and every file hash, then open an onnxruntime session.

    `providers`: None (CPU), or names in order of preference, short ("cuda", "tensorrt", "cpu") or onnxruntime's
    ("CUDAExecutionProvider"); one missing from this onnxruntime is a ProviderError listing what exists, unless
    `allow_fallback` (then CPU, with a warning). `verify_key`: an Ed25519 public key (a PEM file path as
    `openssl pkey -pubout` or `compress keygen` writes it, PEM bytes, or the raw 32 key bytes); the artifact must then
    carry a manifest.sig that verifies with it (`compress sign`), else RuntimeArtifactError. Returns a CausalLM
    (generate, logits, perplexity) for language models, a SpeechModel (transcribe) for speech, else a CompiledModel
    (embed, embed_images, run); its `signature` says whether the artifact is signed and which key verified it.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise FeedTypeError(f"load() takes an artifact folder path (str or pathlib.Path), got {type(path).__name__}")
    if not isinstance(allow_fallback, bool):
        raise FeedTypeError(f"allow_fallback must be True or False, got {type(allow_fallback).__name__}")
    check_threads(threads)
    providers = resolve_providers(providers, allow_fallback)  # before the hash check: refusals come at once
    key = None
    if verify_key is not None:
        from .signing import fingerprint, public_key

        key = public_key(verify_key)  # a bad key is refused before any file is read
    folder = Path(path)
    manifest = read_manifest(folder, verify=True, verify_key=key, complete=False)
    cls = {"causal_lm": CausalLM, "speech": SpeechModel}.get(manifest["preprocess"]["kind"], CompiledModel)
    model = cls(folder, manifest, providers=providers, threads=threads, allow_fallback=allow_fallback, strict=True)
    from .signing import is_signed

    model.signature = {"signed": is_signed(folder), "verified": key is not None,
                       "key": fingerprint(key) if key is not None else None}
    return model


__all__ = ["load", "CompiledModel", "CausalLM", "RuntimeUsageError", "RuntimeArtifactError", "FeedError",
           "FeedTypeError", "ProviderError", "ArtifactKindError", "SpeechModel", "TruncationWarning", "FORMAT_VERSION",
           "read_manifest", "resolve_providers"]
