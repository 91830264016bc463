"""The search forward: the encoder program's block loop with masks instead of removal (DiffRate's training path).

Every token stays in the tensor; the layout is kept exactly as the compiled program would hold it: the tokens still
alive first, in the compiled order (so ToMe's even/odd partition and the pruning ranks match the static program),
then the tokens dropped so far. Dropped tokens carry mask 0 forward (straight-through, so the rates get gradients)
and reach attention through a per-key bias log(mask + eps), which equals DiffRate's multiplicative attention policy.
Pruning ranks the alive tokens by the attention the class token pays them (EViT/DiffRate), padding first to go and
protected tokens never; merging ranks ToMe's A tokens by their best match (`bipartite_soft_matching` with every A
token listed) and adds each merged token, weighted by its straight-through merge weight, into its B destination
(size-weighted sum then divide). With the hard counts, the forward equals the compiled program's up to the eps
leak, so the loss the search sees is the loss the schedule will have.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.models import PAD, PROTECTED
from compressor.program.encoder import MASK_BIAS
from compressor.program.merging import bipartite_soft_matching, max_merge
from compressor.program.pruning import PAD_TIER, PROTECTED_TIER, cls_attention, max_prune

from .rates import KeptCounts

EPS = 1e-6


@dataclass
class Stream:
    """Tokens in compiled order (alive prefix of length `alive`), with per-token size, mask, kind and input groups."""

    x: torch.Tensor  # (B, N, C)
    size: torch.Tensor  # (B, N, 1)
    mask: torch.Tensor  # (B, N) 1 alive, 0 dropped (straight-through values)
    kinds: torch.Tensor  # (B, N)
    groups: torch.Tensor  # (B, N, N_in)
    alive: int
    metric: torch.Tensor | None = None  # (B, N, D) this layer's merge metric

    def reorder(self, order: torch.Tensor, alive: int) -> "Stream":
        """Gather every per-token tensor by `order` (B, N); the first `alive` positions are the live tokens."""
        return Stream(take(self.x, order), take(self.size, order), take(self.mask, order), take(self.kinds, order),
                      take(self.groups, order), alive, take(self.metric, order))


def take(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    """Per-token gather along dim 1: t (B, N, ...) at idx (B, M) -> (B, M, ...)."""
    if t is None:
        return None
    return t.gather(1, idx.view(*idx.shape, *[1] * (t.dim() - 2)).expand(-1, -1, *t.shape[2:]))


@dataclass
class Schedule:
    """Hard per-layer counts of one search forward: tokens pruned and merged, and the counts the cost model reads."""

    prunes: list[int]
    merges: list[int]
    counts: list[torch.Tensor]  # per layer: (tokens entering, tokens after reduction), straight-through tensors


def search_forward(adapter, inputs, prune: KeptCounts | None, merge: KeptCounts | None,
                   proportional: bool, tilt: float = 0.0) -> tuple[torch.Tensor, Stream, Schedule]:
    """Pooled output, final stream (its `x` the final hidden states) and the hard schedule of this forward, every
    distribution tilted by `tilt` (KeptCounts.probabilities: the step's projection onto the budget)."""
    x, kinds = adapter.embed(*inputs)
    b, n = x.shape[:2]
    s = Stream(x, torch.ones(b, n, 1, dtype=x.dtype), torch.ones(b, n, dtype=x.dtype), kinds,
               torch.eye(n, dtype=x.dtype).repeat(b, 1, 1), n)
    protected = adapter.protected_per_sample
    kept_p = prune.expected(tilt) if prune is not None else None
    kept_m = merge.expected(tilt) if merge is not None else None
    prunes, merges, counts = [], [], []
    entering = torch.tensor(float(n))
    for i, layer in enumerate(adapter.layers):
        bias = torch.where(s.kinds == PAD, MASK_BIAS, 0.0).to(s.x.dtype) + (s.mask + EPS).log()
        if proportional:
            bias = bias + s.size[..., 0].log()
        att = layer.attention(s.x, bias)
        s.x, s.metric = att.x, att.metric
        n_in, ste = s.alive, torch.zeros(())
        kp = int(kept_p[i]) if kept_p is not None else None
        km = int(kept_m[i]) if kept_m is not None else None
        n_mid, n_out = layer_counts(n_in, kp, km, protected, i)
        if kp is not None and i > 0:
            ste = ste + kept_p[i] - kept_p[i].detach()
            if n_mid < n_in:
                s = prune_tokens(s, cls_attention(att.probs).detach(), prune, i, n_mid, tilt)
        if km is not None:
            ste = ste + kept_m[i] - kept_m[i].detach()
            if n_out < n_mid:
                s = merge_tokens(s, merge, i, n_mid - n_out, tilt)
        prunes.append(n_in - n_mid)
        merges.append(n_mid - n_out)
        leaving = s.alive + ste
        counts.append((entering, leaving))
        entering = leaving
        s.x = layer.mlp(s.x)
    hidden = adapter.final_norm(s.x)
    pooled = adapter.pool(hidden, s.size * s.mask[..., None], s.kinds)
    s.x = hidden
    return pooled, s, Schedule(prunes, merges, counts)


def layer_counts(n_in: int, kept_prune: int | None, kept_merge: int | None, protected: int, layer: int) -> tuple[int, int]:
    """Tokens after a layer's pruning and after its merging, from its rounded kept counts (None: that reduction is
    off), capped as the compiled program requires. The first block never prunes (DiffRate: its class attention is
    not yet telling)."""
    n_mid = n_in
    if kept_prune is not None and layer > 0:
        n_mid = max(min(n_in, kept_prune), n_in - max_prune(n_in, protected))
    n_out = n_mid
    if kept_merge is not None:
        n_out = max(min(n_mid, kept_merge), n_mid - max_merge(n_mid, protected))
    return n_mid, n_out


def prune_tokens(s: Stream, cls_row: torch.Tensor, rates: KeptCounts, layer: int, keep: int, tilt: float) -> Stream:
    """Drop all but the `keep` alive tokens the class token attends to most (padding first, protected never),
    ranked with the compiled program's tiers (compressor/program/pruning.py)."""
    n = s.alive
    kinds = s.kinds[:, :n]
    pos = torch.arange(n, dtype=cls_row.dtype)[None] / n
    score = torch.where(kinds == PAD, PAD_TIER + pos, torch.where(kinds == PROTECTED, PROTECTED_TIER + pos, cls_row[:, :n]))
    order = score.argsort(dim=1, descending=True)  # rank -> position
    rank = order.argsort(dim=1)  # position -> rank
    survive = rates.survival(layer, rank, keep, tilt)
    mask = torch.cat([s.mask[:, :n] * survive, s.mask[:, n:]], dim=1)
    kept = order[:, :keep].sort(dim=1).values  # survivors keep their order (class token stays first)
    dropped = order[:, keep:]
    rest = torch.arange(n, s.x.shape[1]).expand(s.x.shape[0], -1)
    s.mask = mask
    return s.reorder(torch.cat([kept, dropped, rest], dim=1), keep)


def merge_tokens(s: Stream, rates: KeptCounts, layer: int, r: int, tilt: float) -> Stream:
    """ToMe on the alive tokens: the r A tokens with the best matches merge into their B destinations; every A
    token's merge weight is straight-through (hard 1 for those r, 0 for the rest), so each gets a gradient."""
    n = s.alive
    na = (n + 1) // 2
    m = bipartite_soft_matching(s.metric[:, :n], s.kinds[:, :n], na)  # every A token, best match first
    ranked, dst = m.src_idx[..., 0], m.dst_idx[..., 0]  # (B, na) A index by rank, its B destination
    ranks = torch.arange(na).expand(ranked.shape[0], -1)
    weight = 1.0 - rates.survival(layer, n - 1 - ranks, n - r, tilt)  # merges iff rank < r
    a_pos, b_pos = 2 * ranked, 2 * dst + 1  # positions in the stream
    wm = (weight * take(s.mask, a_pos))[..., None]  # how much of each A token goes to its destination
    add = lambda t: t.scatter_add(1, b_pos[..., None].expand(-1, -1, t.shape[-1]), wm * take(t, a_pos))  # noqa: E731
    size = add(s.size)
    s.x, s.groups = add(s.x * s.size) / size, add(s.groups)
    s.size, s.mask = size, s.mask.scatter(1, a_pos, take(s.mask, a_pos) * (1.0 - weight))
    unmerged = a_pos[:, r:].sort(dim=1).values
    merged = a_pos[:, :r]
    b_all = torch.arange(1, n, 2).expand(s.x.shape[0], -1)
    rest = torch.arange(n, s.x.shape[1]).expand(s.x.shape[0], -1)
    return s.reorder(torch.cat([unmerged, b_all, merged, rest], dim=1), n - r)
