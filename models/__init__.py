"""One adapter per model family. Adding a family is one file plus one line in ADAPTERS (docs/adding-a-family.md).

Every adapter is a `ModelAdapter` (models/base.py) and declares its capabilities by inheriting the interfaces of
models/capabilities.py (`EncoderAdapter`, `DecoderAdapter`, `SpeechAdapter`, `HeadPrunable`, `WidthPrunable`,
`DepthPrunable`, `SliceableAdapter`), which stages and passes test with `isinstance`.
"""

from __future__ import annotations

from .base import NORMAL, PAD, PROTECTED, Attended, InputSpec, LayerAdapter, ModelAdapter
from .bert import BertAdapter, RobertaAdapter
from .capabilities import (DecoderAdapter, DecoderLayer, DepthPrunable, EncoderAdapter, EncoderLayer, HeadPrunable,
                           SliceableAdapter, SliceableLayer, SpeechAdapter, WidthPrunable)
from .clip_vision import ClipAdapter, ClipVisionAdapter
from .dinov2 import Dinov2Adapter
from .distilbert import DistilBertAdapter
from .gemma3 import Gemma3Adapter
from .llama import LlamaAdapter, LlamaLayerAdapter, LlamaLikeAdapter
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
           "NORMAL", "PROTECTED", "PAD", "EncoderAdapter", "DecoderAdapter", "SpeechAdapter", "HeadPrunable",
           "WidthPrunable", "DepthPrunable", "SliceableAdapter", "EncoderLayer", "DecoderLayer", "SliceableLayer",
           "LlamaAdapter", "LlamaLikeAdapter", "LlamaLayerAdapter"]
