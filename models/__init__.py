"""One adapter per model family. Adding a family is one file plus one line in ADAPTERS."""

from __future__ import annotations

from .base import NORMAL, PAD, PROTECTED, InputSpec, LayerAdapter, ModelAdapter
from .bert import BertAdapter
from .dinov2 import Dinov2Adapter
from .llama import LlamaAdapter, LlamaLayerAdapter

ADAPTERS: list[type[ModelAdapter]] = [BertAdapter, Dinov2Adapter, LlamaAdapter]


def adapter_for(model_type: str) -> type[ModelAdapter] | None:
    return next((a for a in ADAPTERS if model_type in a.model_types), None)


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


__all__ = ["ADAPTERS", "adapter_for", "supported_model_types", "ModelAdapter", "LayerAdapter", "InputSpec",
           "NORMAL", "PROTECTED", "PAD"]
