"""The static-shape forward that is captured and exported: embeddings, blocks, pooled output.

It reuses the family adapter's modules (and so the weights passes rewrote) and applies the token plan between
each block's attention and MLP. With an empty plan it computes exactly what the transformers model computes
(tests check it), so the dense baseline and the compressed model are exported from the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from compressor.models import PAD, ModelAdapter

from compressor.program.merging import bipartite_soft_matching

MASK_BIAS = -1e9


@dataclass
class TokenPlan:
    """How many tokens each layer merges away, fixed at compile time."""

    merges: list[int] = field(default_factory=list)
    proportional_attention: bool = True

    def token_counts(self, num_tokens: int, num_layers: int) -> list[int]:
        """Tokens entering each layer's MLP, plus the count at the output (length num_layers + 1, first = input)."""
        counts = [num_tokens]
        for i in range(num_layers):
            counts.append(counts[-1] - (self.merges[i] if i < len(self.merges) else 0))
        return counts


class EncoderProgram(nn.Module):
    def __init__(self, adapter: ModelAdapter, plan: TokenPlan | None = None):
        super().__init__()
        self.adapter = adapter
        self.model = adapter.model  # registered so export sees the parameters
        self.plan = plan or TokenPlan()

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.encode(*inputs).pooled

    def encode(self, *inputs: torch.Tensor, track_groups: bool = False) -> "Encoded":
        """The forward, keeping the final hidden states, token sizes and kinds; with `track_groups`, also which input
        tokens each token holds (merged as the features are), so another model's states can be merged the same way
        (the distill pass compares a merged student with its dense teacher so)."""
        x, kinds = self.adapter.embed(*inputs)
        b, n = x.shape[:2]
        size = torch.ones(b, n, 1, dtype=x.dtype)
        merging = any(self.plan.merges)
        groups = torch.eye(n, dtype=x.dtype).repeat(b, 1, 1) if merging and track_groups else None
        for i, layer in enumerate(self.adapter.layers):
            bias = torch.where(kinds == PAD, MASK_BIAS, 0.0).to(x.dtype)
            if merging and self.plan.proportional_attention:
                bias = bias + size[..., 0].log()
            x, metric = layer.attention(x, bias)
            r = self.plan.merges[i] if i < len(self.plan.merges) else 0
            if r > 0:
                m = bipartite_soft_matching(metric, kinds, r)
                x = m.merge(x * size)
                size = m.merge(size)
                x = x / size
                kinds = m.select(kinds)
                if groups is not None:
                    groups = m.merge(groups)
            x = layer.mlp(x)
        hidden = self.adapter.final_norm(x)
        return Encoded(self.adapter.pool(hidden, size, kinds), hidden, size, kinds, groups)


class Encoded(NamedTuple):
    pooled: torch.Tensor  # (B, D) the program's output
    hidden: torch.Tensor  # (B, N, C) final hidden states, before pooling
    size: torch.Tensor  # (B, N, 1) input tokens each token holds
    kinds: torch.Tensor  # (B, N) NORMAL / PROTECTED / PAD
    groups: torch.Tensor | None  # (B, N, N_in) how many of each input token a token holds; None unless tracked
