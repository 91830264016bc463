"""The static-shape forward that is captured and exported: embeddings, blocks, pooled output.

It reuses the family adapter's modules (and so the weights passes rewrote) and applies the token plan between
each block's attention and MLP: first pruning, then merging (DiffRate's order). With an empty plan it computes
exactly what the transformers model computes (tests check it), so the dense baseline and the compressed model are
exported from the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from compressor.models.base import PAD
from compressor.models.capabilities import EncoderAdapter

from compressor.program.merging import bipartite_soft_matching, pitome_margin, pitome_matching
from compressor.program.pruning import attention_received, cls_attention, prune_tokens

MASK_BIAS = -1e9
MERGE_METHODS = ("tome", "pitome", "pitome_text")  # pitome_text: PiToMe with its text variant's Gaussian energy


@dataclass
class TokenPlan:
    """How many tokens each layer drops and merges away, fixed at compile time.

    Within block i, after attention: drop `prunes[i]` tokens ranked by `prune_by` ("cls_attention" or
    "attention_received"), then merge `merges[i]` with `merge_method` ("tome" or "pitome"), then the MLP.
    Empty lists mean none.
    """

    merges: list[int] = field(default_factory=list)
    proportional_attention: bool = True
    prunes: list[int] = field(default_factory=list)
    prune_by: str = "cls_attention"
    merge_method: str = "tome"
    fuse_pruned: bool = False  # dropped real tokens are fused into one kept slot (EViT), see program/pruning.py

    def merges_at(self, i: int) -> int:
        return self.merges[i] if i < len(self.merges) else 0

    def prunes_at(self, i: int) -> int:
        return self.prunes[i] if i < len(self.prunes) else 0

    @property
    def active(self) -> bool:
        """Whether the plan changes the token count anywhere (else the program is the dense one)."""
        return any(self.merges) or any(self.prunes)

    @property
    def sized(self) -> bool:
        """Whether tokens can stand for several input tokens (merging, or fused pruning)."""
        return any(self.merges) or (self.fuse_pruned and any(self.prunes))

    def token_counts(self, num_tokens: int, num_layers: int) -> list[int]:
        """Tokens entering each layer's MLP, plus the count at the output (length num_layers + 1, first = input)."""
        counts = [num_tokens]
        for i in range(num_layers):
            counts.append(counts[-1] - self.prunes_at(i) - self.merges_at(i))
        return counts

    def describe(self) -> dict:
        """The manifest's record of the plan (without the counts, which need the model's sizes)."""
        return {"prunes": list(self.prunes), "prune_by": self.prune_by, "merge_method": self.merge_method,
                "fuse_pruned": self.fuse_pruned}


class EncoderProgram(nn.Module):
    def __init__(self, adapter: EncoderAdapter, plan: TokenPlan | None = None):
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
        plan, layers = self.plan, self.adapter.layers
        x, kinds = self.adapter.embed(*inputs)
        b, n = x.shape[:2]
        size = torch.ones(b, n, 1, dtype=x.dtype)
        groups = torch.eye(n, dtype=x.dtype).repeat(b, 1, 1) if plan.active and track_groups else None
        # SpAtten's cumulative score is summed from the first layer up to the last that prunes
        last_prune = max((i for i in range(len(layers)) if plan.prunes_at(i) > 0), default=-1)
        received = torch.zeros(b, n, 1, dtype=x.dtype) if plan.prune_by == "attention_received" and last_prune >= 0 else None
        for i, layer in enumerate(layers):
            bias = torch.where(kinds == PAD, MASK_BIAS, 0.0).to(x.dtype)
            if plan.sized and plan.proportional_attention:
                bias = bias + size[..., 0].log()
            att = layer.attention(x, bias)
            x, metric = att.x, att.metric
            if received is not None and i <= last_prune:
                received = received + attention_received(att.probs, size, kinds)[..., None]
            p = plan.prunes_at(i)
            if p > 0:
                importance = received[..., 0] if received is not None else cls_attention(att.probs)
                pr = prune_tokens(importance, kinds, p, plan.fuse_pruned)
                x, metric = pr.mean(x, size), pr.mean(metric, size)
                size, kinds = pr.size(size), pr.kinds(kinds)
                if received is not None:
                    received = pr.sum(received)
                if groups is not None:
                    groups = pr.sum(groups)
            r = plan.merges_at(i)
            if r > 0:
                if plan.merge_method in ("pitome", "pitome_text"):
                    kernel = "gaussian" if plan.merge_method == "pitome_text" else "elu"
                    m = pitome_matching(metric, kinds, r, pitome_margin(i, len(layers)), kernel)
                else:
                    m = bipartite_soft_matching(metric, kinds, r)
                x = m.merge(x * size)
                size = m.merge(size)
                x = x / size
                kinds = m.select(kinds)
                if received is not None and i < last_prune:
                    received = m.merge(received)
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
