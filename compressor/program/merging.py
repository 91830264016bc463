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


# PiToMe ("Accelerating Transformers with Spectrum-Preserving Token Merging", Tran et al., NeurIPS 2024): only the
# 2r tokens with the highest energy (the most redundant ones) are merge candidates; the rest are protected.
PITOME_MARGIN = 0.9  # layer i of L uses margin 0.9 - 0.9 * i / L: deeper layers count more neighbours as similar
PITOME_ALPHA = 1.0
PAD_TIER = 3.0  # padding ranks above every energy (which lies in [-alpha, 1 - margin]): it merges first
PROTECTED_TIER = -10.0


@dataclass
class IndexMatching:
    """A merge described in the input's own token positions: src tokens are summed into dst tokens, then the
    survivors (`keep_idx`, in their original order) are kept."""

    keep_idx: torch.Tensor  # (B, N - r) surviving positions, ascending
    src_idx: torch.Tensor  # (B, r) positions that merge away
    dst_idx: torch.Tensor  # (B, r) their destinations
    src_weight: torch.Tensor  # (B, r, 1) 0 drops a padding token that has no padding to merge into, else 1

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N - r, C): sum each src token (times its weight) into its dst, keep the survivors."""
        c = x.shape[-1]
        src = x.gather(1, self.src_idx[..., None].expand(-1, -1, c)) * self.src_weight
        summed = x.scatter_add(1, self.dst_idx[..., None].expand(-1, -1, c), src)
        return summed.gather(1, self.keep_idx[..., None].expand(-1, -1, c))

    def select(self, labels: torch.Tensor) -> torch.Tensor:
        """Carry per-token labels (B, N) through the merge: a destination keeps its own label."""
        return labels.gather(1, self.keep_idx)


def pitome_margin(layer: int, num_layers: int) -> float:
    return PITOME_MARGIN - PITOME_MARGIN * layer / max(1, num_layers)


def energy_scores(metric: torch.Tensor, kinds: torch.Tensor, margin: float, alpha: float = PITOME_ALPHA,
                  kernel: str = "elu") -> torch.Tensor:
    """PiToMe's energy (B, N): mean over ordinary tokens j of ELU(cos(x_i, x_j) - margin) (the vision variant), or with
    `kernel = "gaussian"` of exp(-((1 - cos) / sigma)^2 / 2), sigma = 1 - margin (the reference's text variant,
    `pitome_text`; its constant 1 / (sigma sqrt(2 pi)) does not change a layer's ranking and is left out). High
    energy = many close neighbours = safe to merge. Returns it with the normalised metric's similarity matrix."""
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    sim = metric @ metric.transpose(-1, -2)
    if kernel == "gaussian":
        sigma = max(1.0 - margin, 1e-3)
        f = torch.exp(-0.5 * ((1.0 - sim) / sigma) ** 2)
    else:
        shifted = sim - margin
        f = torch.where(shifted > 0, shifted, alpha * (shifted.clamp(max=0.0).exp() - 1.0))
    normal = (kinds == NORMAL)[:, None, :].to(sim.dtype)
    return (f * normal).sum(-1) / normal.sum(-1).clamp(min=1.0), sim


def pitome_matching(metric: torch.Tensor, kinds: torch.Tensor, r: int, margin: float, kernel: str = "elu") -> IndexMatching:
    """Merge r tokens: rank by energy (padding first, protected tokens last), split the 2r top-ranked tokens
    alternately into A and B, and merge every A token into its most similar B token.

    metric: (B, N, D) keys averaged over heads; kinds: (B, N) NORMAL / PROTECTED / PAD. r is fixed at compile time.
    """
    energy, sim = energy_scores(metric, kinds, margin, kernel=kernel)
    n = kinds.shape[1]
    # a unique per-position offset orders padding (and protected tokens) the same way in PyTorch and onnxruntime
    pos = torch.arange(n, dtype=sim.dtype)[None] / n
    score = torch.where(kinds == PAD, PAD_TIER + pos, torch.where(kinds == NORMAL, energy, PROTECTED_TIER + pos))
    order = score.argsort(dim=-1, descending=True)
    a_idx, b_idx, rest = order[:, 0:2 * r:2], order[:, 1:2 * r:2], order[:, 2 * r:]
    pair = sim.gather(1, a_idx[..., None].expand(-1, -1, n)).gather(2, b_idx[:, None, :].expand(-1, r, -1))
    ka, kb = kinds.gather(1, a_idx)[..., None], kinds.gather(1, b_idx)[:, None, :]
    both_normal = (ka == NORMAL) & (kb == NORMAL)
    both_pad = (ka == PAD) & (kb == PAD)
    offset = torch.arange(r * r, dtype=sim.dtype).view(1, r, r) / (r * r)
    pair = torch.where(both_pad, PAD_PAIR_SCORE + offset, torch.where(both_normal, pair, FORBIDDEN_SCORE + offset))
    best = pair.argmax(dim=-1)
    dst_idx = b_idx.gather(1, best)
    src_kind, dst_kind = kinds.gather(1, a_idx), kinds.gather(1, dst_idx)
    src_weight = torch.where((src_kind == PAD) & (dst_kind != PAD), 0.0, 1.0).to(metric.dtype)[..., None]
    keep_idx = torch.cat([rest, b_idx], dim=1).sort(dim=1).values
    return IndexMatching(keep_idx, a_idx, dst_idx, src_weight)
