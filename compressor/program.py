"""The static-shape forward that is captured and exported: embeddings, blocks, pooled output.

It reuses the family adapter's modules (and so the weights passes rewrote) and applies the token plan between
each block's attention and MLP. With an empty plan it computes exactly what the transformers model computes
(tests check it), so the dense baseline and the compressed model are exported from the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.models import PAD, ModelAdapter

from .merging import bipartite_soft_matching

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
        x, kinds = self.adapter.embed(*inputs)
        size = torch.ones(x.shape[0], x.shape[1], 1, dtype=x.dtype)
        merging = any(self.plan.merges)
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
            x = layer.mlp(x)
        return self.adapter.pool(self.adapter.final_norm(x), size, kinds)
