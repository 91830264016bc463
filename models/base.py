"""Family adapters: where a model family keeps its embeddings, blocks, attention q/k/v/o, MLP and norms.

Passes rewrite weights and structure through these adapters; the static-shape program (`compressor.program`) runs a
block as `attention` then `mlp`, so a pass such as token merging can act between the two without patching the
model's own forward. Each family's block math is written against the transformers version the project pins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

# Token kinds carried beside the hidden states: merging never mixes kinds.
NORMAL, PROTECTED, PAD = 0, 1, 2


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name


def multi_head_attention(x: torch.Tensor, q: nn.Linear, k: nn.Linear, v: nn.Linear, heads: int, bias: torch.Tensor):
    """Plain softmax attention with an additive per-key bias (padding mask, log token size).

    Returns the context (B, N, C) and the keys averaged over heads (B, N, C/heads): ToMe's similarity metric.
    Written out as matmul + softmax so it lowers to plain ONNX ops at static shapes.
    """
    b, n, _ = x.shape
    hd = q.out_features // heads
    qh = q(x).view(b, n, heads, hd).transpose(1, 2)
    kh = k(x).view(b, n, heads, hd).transpose(1, 2)
    vh = v(x).view(b, n, heads, hd).transpose(1, 2)
    logits = (qh @ kh.transpose(-1, -2)) * (1.0 / math.sqrt(hd)) + bias[:, None, None, :]
    ctx = logits.softmax(dim=-1) @ vh
    return ctx.transpose(1, 2).reshape(b, n, heads * hd), kh.mean(dim=1)


class LayerAdapter:
    """One transformer block: named access to its parts and its math split at the merge point."""

    def __init__(self, layer: nn.Module, heads: int):
        self.layer = layer
        self.heads = heads

    # named parts, for passes that rewrite weights
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    fc_in: nn.Linear
    fc_out: nn.Linear

    def attention(self, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def residual(self, x: torch.Tensor, block: str) -> torch.Tensor:
        """The residual path around a block ("attn" or "mlp"): identity, or SliceGPT's shortcut matrix between the
        rotations before and after it (per_layer mode)."""
        shortcut = getattr(self.layer, f"{block}_shortcut", None)
        return x if shortcut is None else shortcut(x)


class ModelAdapter:
    """A model family. Subclasses set `family`, `modality`, `model_types` and `protected_per_sample`."""

    family: str = ""
    modality: str = ""  # "text" or "image"
    model_types: tuple[str, ...] = ()
    protected_per_sample: int = 1  # tokens that never merge, counted for schedule caps
    auto_class: str = "AutoModel"  # the transformers class that loads the folder
    norm_placement: str = "post"  # "pre" (norm before attention/MLP) or "post" (after the residual add)

    def __init__(self, model: nn.Module, folder):
        self.model = model
        self.folder = folder
        self.config = model.config

    @property
    def layers(self) -> list[LayerAdapter]:
        raise NotImplementedError

    def input_specs(self, shapes: dict) -> list[InputSpec]:
        raise NotImplementedError

    def num_tokens(self, shapes: dict) -> int:
        raise NotImplementedError

    def prepare(self, shapes: dict) -> None:
        """Precompute shape-specific constants eagerly, before any capture (tracing must not create them)."""

    def embed(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs to (hidden states (B, N, C), token kinds (B, N))."""
        raise NotImplementedError

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pool(self, x: torch.Tensor, size: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reference_forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The pooled output computed by the unmodified transformers model: the ground truth for tests."""
        raise NotImplementedError

    def preprocess_config(self, shapes: dict) -> dict:
        """What the runtime needs to turn raw inputs into feeds (stored in the artifact)."""
        raise NotImplementedError

    def artifact_files(self) -> list[str]:
        """Files from the model folder that the artifact carries for pre-processing (tokenizer files)."""
        return []

    def describe(self) -> dict:
        c = self.config
        return {
            "family": self.family,
            "modality": self.modality,
            "layers": c.num_hidden_layers,
            "hidden_size": c.hidden_size,
            "heads": c.num_attention_heads,
            "params": sum(p.numel() for p in self.model.parameters()),
        }
