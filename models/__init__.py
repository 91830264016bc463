"""One adapter per model family. Adding a family is one file plus one line in ADAPTERS."""

from __future__ import annotations

from .base import NORMAL, PAD, PROTECTED, Attended, InputSpec, LayerAdapter, ModelAdapter
from .bert import BertAdapter, RobertaAdapter
from .clip_vision import ClipAdapter, ClipVisionAdapter
from .dinov2 import Dinov2Adapter
from .distilbert import DistilBertAdapter
from .gemma3 import Gemma3Adapter
from .llama import LlamaAdapter, LlamaLayerAdapter
from .mistral import MistralAdapter
from .mpnet import MPNetAdapter
from .phi3 import Phi3Adapter
from .qwen import Qwen2Adapter, Qwen3Adapter
from .vit import DeiTAdapter, ViTAdapter
from .whisper import WhisperAdapter

ADAPTERS: list[type[ModelAdapter]] = [BertAdapter, RobertaAdapter, DistilBertAdapter, MPNetAdapter, Dinov2Adapter,
                                      ViTAdapter, DeiTAdapter, ClipVisionAdapter, ClipAdapter, LlamaAdapter, Qwen2Adapter, Qwen3Adapter, MistralAdapter,
                                      Gemma3Adapter, Phi3Adapter, WhisperAdapter]


def adapter_for(model_type: str) -> type[ModelAdapter] | None:
    return next((a for a in ADAPTERS if model_type in a.model_types), None)


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


__all__ = ["ADAPTERS", "adapter_for", "supported_model_types", "ModelAdapter", "LayerAdapter", "InputSpec", "Attended",
           "NORMAL", "PROTECTED", "PAD"]
