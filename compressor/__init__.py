"""compressor: an ahead-of-time compression compiler for transformers.

    import compressor
    handle = compressor.load("example:minilm", batch=16, seq_len=128)
    compressor.Pipeline([compressor.passes.TokenMerge(r=8)]).run(handle)
    manifest = compressor.compile_artifact(handle, "out/minilm")

Attributes load lazily so that `compressor.runtime` (numpy + onnxruntime only) never pulls in torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load": ("compressor.program.handle", "load"),
    "ModelHandle": ("compressor.program.handle", "ModelHandle"),
    "Pipeline": ("compressor.pipeline.pass_manager", "Pipeline"),
    "Pass": ("compressor.pipeline.pass_base", "Pass"),
    "PassResult": ("compressor.pipeline.pass_base", "PassResult"),
    "register": ("compressor.pipeline.pass_base", "register"),
    "compile_artifact": ("compressor.artifact.compile", "compile_artifact"),
    "ValidationConfig": ("compressor.validation.encoder", "ValidationConfig"),
    "load_recipe": ("compressor.pipeline.recipe", "load_recipe"),
    "run_recipe": ("compressor.pipeline.build", "run_recipe"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'compressor' has no attribute {name!r}")


__all__ = list(_LAZY) + ["__version__"]
