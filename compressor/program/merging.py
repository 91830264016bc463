"""Bipartite soft matching (ToMe), made static and exportable.

`bipartite_soft_matching` returns a `Matching` whose `merge` sums matched tokens and whose `select` keeps
per-token labels; callers merge size-weighted features then divide, because `scatter_reduce(reduce="mean")`
exports as a plain scatter under dynamo. The number of merged tokens `r` is a Python int fixed at compile time,
so every shape in the graph is static.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.models import NORMAL, PAD

# Score tiers: padding merges into padding first (lossless for real tokens), then ordinary tokens by cosine
# similarity in [-1, 1]; every other pairing (protected tokens, padding with real tokens) ranks last and is only
# used if a schedule leaves no other choice.
PAD_PAIR_SCORE = 2.0
FORBIDDEN_SCORE = -10.0


@dataclass
class Matching:
    unm_idx: torch.Tensor  # (B, Na - r, 1) A tokens that stay
    src_idx: torch.Tensor  # (B, r, 1) A tokens that merge away
    dst_idx: torch.Tensor  # (B, r, 1) their destinations in B

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """Sum each merged A token into its B destination: (B, N, C) -> (B, N - r, C)."""
        a, b = x[:, ::2], x[:, 1::2]
        c = x.shape[-1]
        unm = a.gather(1, self.unm_idx.expand(-1, -1, c))
        src = a.gather(1, self.src_idx.expand(-1, -1, c))
        dst = b.scatter_add(1, self.dst_idx.expand(-1, -1, c), src)
        return torch.cat([unm, dst], dim=1)

    def select(self, labels: torch.Tensor) -> torch.Tensor:
        """Carry per-token labels (B, N) through the merge: a destination keeps its own label."""
        a, b = labels[:, ::2], labels[:, 1::2]
        return torch.cat([a.gather(1, self.unm_idx[..., 0]), b], dim=1)


def bipartite_soft_matching(metric: torch.Tensor, kinds: torch.Tensor, r: int) -> Matching:
    """Match the r most similar A tokens (even positions) to their best B token (odd positions).

    metric: (B, N, D) keys averaged over heads; kinds: (B, N) NORMAL / PROTECTED / PAD.
    """
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    a, b = metric[:, ::2], metric[:, 1::2]
    ka, kb = kinds[:, ::2, None], kinds[:, None, 1::2]
    scores = a @ b.transpose(-1, -2)
    both_normal = (ka == NORMAL) & (kb == NORMAL)
    both_pad = (ka == PAD) & (kb == PAD)
    # padding and forbidden pairs would all tie; a unique per-pair offset in [0, 1) breaks the ties the same way
    # in PyTorch and onnxruntime, so the surviving positions (and later partitions) do not depend on sort order
    na, nb = a.shape[1], b.shape[1]
    pair = torch.arange(na * nb, dtype=scores.dtype).view(1, na, nb) / (na * nb)
    scores = torch.where(both_pad, PAD_PAIR_SCORE + pair, torch.where(both_normal, scores, FORBIDDEN_SCORE + pair))
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    # keep surviving A tokens in their original order, so CLS stays at position 0
    unm_idx = edge_idx[:, r:].sort(dim=1).values
    src_idx = edge_idx[:, :r]
    dst_idx = node_idx[..., None].gather(1, src_idx)
    return Matching(unm_idx, src_idx, dst_idx)


def max_merge(num_tokens: int, protected: int) -> int:
    """The most tokens one layer may merge: never protected tokens, never more than half of the rest."""
    return max(0, (num_tokens - protected) // 2)
