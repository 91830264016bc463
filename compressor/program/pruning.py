"""Token pruning (EViT, SpAtten, DiffRate's pruning half), made static and exportable.

A layer drops a fixed number p of tokens (a Python int fixed at compile time, so every shape is static), ranked
by an importance read from the attention probabilities: padding goes first (free), protected tokens (CLS, SEP)
never. Survivors keep their original order, so the class token stays at position 0.

With `fuse` (EViT's inattentive token fusion) the count stays the same but the last kept slot holds the fusion of
every dropped real token instead of the (p+1)-th best token: their mean weighted by importance times size, its size
their summed size. One slot, appended at the end, keeps shapes static.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.models import NORMAL, PAD, PROTECTED

IMPORTANCE = ("cls_attention", "attention_received")
# score tiers: padding below every importance (which lies in [0, num_layers]), protected tokens above
PAD_TIER = -10.0
PROTECTED_TIER = 1000.0
MIN_KEPT = 2  # a layer never leaves fewer real-or-protected slots than the protected tokens plus this


def cls_attention(probs: torch.Tensor) -> torch.Tensor:
    """Attention the class token (position 0) pays each token, mean over heads (EViT, DiffRate): (B, N)."""
    return probs[:, :, 0, :].mean(dim=1)


def attention_received(probs: torch.Tensor, size: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
    """Attention each token receives, mean over heads and over the real query tokens (size-weighted): (B, N).
    SpAtten accumulates it over layers."""
    w = size[..., 0] * (kinds != PAD).to(size.dtype)
    w = w / w.sum(dim=1, keepdim=True).clamp(min=1e-9)
    return (w[:, None, :] @ probs.mean(dim=1))[:, 0]


@dataclass
class Pruning:
    keep_idx: torch.Tensor  # (B, K) kept positions, ascending (K = N - p, or N - p - 1 plus the fused slot)
    fuse_weight: torch.Tensor | None  # (B, N, 1) importance of each dropped real token, 0 elsewhere; None: no fusion

    def _kept(self, x: torch.Tensor) -> torch.Tensor:
        return x.gather(1, self.keep_idx[..., None].expand(-1, -1, x.shape[-1]))

    def mean(self, x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        """Features (B, N, C) -> (B, N - p, C); the fused slot is the importance- and size-weighted mean."""
        kept = self._kept(x)
        if self.fuse_weight is None:
            return kept
        w = self.fuse_weight * size
        fused = (x * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp(min=1e-9)
        return torch.cat([kept, fused], dim=1)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Additive per-token quantities (B, N, C) -> (B, N - p, C): the fused slot sums the dropped real tokens."""
        kept = self._kept(t)
        if self.fuse_weight is None:
            return kept
        fused = (t * (self.fuse_weight > 0).to(t.dtype)).sum(dim=1, keepdim=True)
        return torch.cat([kept, fused], dim=1)

    def size(self, size: torch.Tensor) -> torch.Tensor:
        """Token sizes; a fused slot that received no real token (only padding was dropped) has size 1."""
        out = self.sum(size)
        if self.fuse_weight is None:
            return out
        return torch.cat([out[:, :-1], torch.where(out[:, -1:] > 0, out[:, -1:], 1.0)], dim=1)

    def kinds(self, kinds: torch.Tensor) -> torch.Tensor:
        kept = kinds.gather(1, self.keep_idx)
        if self.fuse_weight is None:
            return kept
        real = (self.fuse_weight[..., 0] > 0).any(dim=1, keepdim=True)
        return torch.cat([kept, torch.where(real, NORMAL, PAD).to(kinds.dtype)], dim=1)


def prune_tokens(importance: torch.Tensor, kinds: torch.Tensor, p: int, fuse: bool = False) -> Pruning:
    """Drop the p least important tokens (padding first, protected never); importance: (B, N) >= 0."""
    n = kinds.shape[1]
    # unique per-position offsets order padding and protected tokens the same way in PyTorch and onnxruntime
    pos = torch.arange(n, dtype=importance.dtype)[None] / n
    score = torch.where(kinds == PAD, PAD_TIER + pos, torch.where(kinds == PROTECTED, PROTECTED_TIER + pos, importance))
    order = score.argsort(dim=-1, descending=True)
    kept = n - p - (1 if fuse else 0)
    keep_idx = order[:, :kept].sort(dim=1).values
    if not fuse:
        return Pruning(keep_idx, None)
    dropped = torch.ones_like(importance).scatter(1, keep_idx, 0.0) * (kinds == NORMAL).to(importance.dtype)
    # a tiny floor keeps a dropped token with zero importance in the mean (weights only rank, they never vanish)
    return Pruning(keep_idx, (dropped * (importance + 1e-6))[..., None])


def max_prune(num_tokens: int, protected: int) -> int:
    """The most tokens one layer may drop: protected tokens and MIN_KEPT more (one of them the fused slot) stay."""
    return max(0, num_tokens - protected - MIN_KEPT)
