"""token_prune: drop the least important tokens between each block's attention and MLP, at static shapes.

Importance is read from the block's own attention probabilities: `cls_attention` (the attention the class token
pays each token, mean over heads: EViT, DiffRate) or `attention_received` (attention each token receives, averaged
over query tokens and heads and accumulated over layers: SpAtten). Padding is dropped first, protected tokens
never. `fuse_pruned` keeps the dropped real tokens as one fused token in the last kept slot (EViT's inattentive
token fusion), so the count is the same. Within a layer the plan drops before it merges (token_merge composes).
The schedule is resolved at compile time from `r` (constant or per layer) or a FLOPs `reduction` target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from compressor.errors import UsageError
from compressor.pipeline.pass_base import Pass, PassResult, register
from compressor.program.merging import max_merge
from compressor.program.pruning import IMPORTANCE, max_prune

from compressor.program.token_cost import TokenFlops, smallest_rate


@dataclass
class TokenPruneConfig:
    r: int | list[int] | None = field(default=None, metadata={"help": "tokens dropped per layer: one int (8 when neither r nor reduction is given), or a list with one per layer"})
    reduction: float | None = field(default=None, metadata={"help": "target FLOPs reduction in (0, 1), e.g. 0.4; the pass picks the smallest constant r reaching it"})
    importance: str = field(default="cls_attention", metadata={"help": "cls_attention (EViT/DiffRate; models whose class token is pooled) or attention_received (SpAtten, cumulative)"})
    fuse_pruned: bool = field(default=False, metadata={"help": "fuse the dropped tokens into one kept token (importance- and size-weighted mean) instead of discarding them"})
    first_layer: int = field(default=0, metadata={"help": "with a constant r, layers before this one drop nothing (early attention ranks tokens poorly)"})

    def __post_init__(self):
        if self.r is not None and self.reduction is not None:
            raise ValueError("give either r or reduction, not both")
        if self.r is None and self.reduction is None:
            self.r = 8
        if isinstance(self.r, int) and self.r < 0 or isinstance(self.r, list) and any(v < 0 for v in self.r):
            raise ValueError(f"r must be non-negative, got {self.r}")
        if self.reduction is not None and not 0.0 < self.reduction < 1.0:
            raise ValueError(f"reduction must lie strictly between 0 and 1, got {self.reduction}")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"importance must be one of {', '.join(IMPORTANCE)}, got {self.importance!r}")
        if self.first_layer < 0:
            raise ValueError(f"first_layer must be non-negative, got {self.first_layer}")


def prune_cap(n: int, merges: int, protected: int) -> int:
    """The most a layer with n tokens may drop and still merge `merges` of what remains."""
    return max(0, min(max_prune(n, protected), n - protected - 2 * merges))


@register
class TokenPrune(Pass):
    name = "token_prune"
    summary = "drop the least attended tokens per layer (EViT class attention or SpAtten cumulative attention), optionally fused into one"
    Config = TokenPruneConfig
    requires = frozenset({"encoder"})
    ensures = frozenset({"token_plan"})

    def check(self, handle) -> None:
        super().check(handle)
        cfg: TokenPruneConfig = self.config
        if cfg.importance == "cls_attention" and not handle.adapter.has_class_token:
            raise UsageError(f"token_prune: importance = cls_attention needs a class token that the output is pooled from; "
                             f"this {handle.adapter.family} model pools by {getattr(handle.adapter, 'pooling', 'mean')}: use importance = attention_received")
        plan = handle.plan
        if any(plan.prunes) and (plan.prune_by != cfg.importance or plan.fuse_pruned != cfg.fuse_pruned):
            raise UsageError(f"token_prune: the plan already prunes by {plan.prune_by} (fuse_pruned = {plan.fuse_pruned}); a second token_prune must use the same")

    def run(self, handle, ctx) -> PassResult:
        cfg: TokenPruneConfig = self.config
        layers, tokens = handle.num_layers, handle.num_tokens
        protected = handle.adapter.protected_per_sample
        plan = handle.plan
        merges = plan.merges or [0] * layers
        previous = plan.prunes or [0] * layers
        if isinstance(cfg.r, list):
            if len(cfg.r) != layers:
                raise UsageError(f"token_prune: r lists one value per layer; this model has {layers} layers, got {len(cfg.r)}")
            prunes = list(cfg.r)
        elif cfg.r is not None:
            prunes = self._constant(cfg.r, tokens, protected, merges, previous, cfg.first_layer)
        else:
            prunes = self._for_reduction(handle, cfg.reduction, tokens, protected, merges, previous, cfg.first_layer)
        combined = [a + b for a, b in zip(previous, prunes)]
        self._check(combined, merges, tokens, protected)
        plan.prunes = combined
        plan.prune_by = cfg.importance
        plan.fuse_pruned = cfg.fuse_pruned
        counts = plan.token_counts(tokens, layers)
        return PassResult(modified=any(prunes), info={"schedule": combined, "importance": cfg.importance, "token_counts": counts})

    @staticmethod
    def _constant(r, tokens, protected, merges, previous, first_layer) -> list[int]:
        """Constant r on top of earlier drops: caps are computed on what the plan leaves."""
        out, n = [], tokens
        for i, (m, p) in enumerate(zip(merges, previous)):
            step = min(r, max(0, prune_cap(n, m, protected) - p)) if i >= first_layer else 0
            out.append(step)
            n -= p + step + m
        return out

    @staticmethod
    def _check(prunes: list[int], merges: list[int], tokens: int, protected: int) -> None:
        n = tokens
        for i, (p, m) in enumerate(zip(prunes, merges)):
            cap = max_prune(n, protected)
            if p > cap:
                raise UsageError(f"token_prune: layer {i} would drop {p} tokens but at most {cap} of its {n} may go "
                                 f"({protected} protected and 2 more stay); lower r")
            if m > max_merge(n - p, protected):
                raise UsageError(f"token_prune: layer {i} would drop {p} of its {n} tokens, leaving too few for the {m} "
                                 f"that token_merge merges there; lower r")
            n -= p + m

    def _for_reduction(self, handle, target, tokens, protected, merges, previous, first_layer) -> list[int]:
        """Smallest constant r whose FLOPs (blocks analytic, the rest measured on the captured graph) meet target."""
        cost = TokenFlops.of(handle)

        def reduction(prunes):
            return cost.reduction([m + p + q for m, p, q in zip(merges, previous, prunes)])

        found = smallest_rate(lambda r: self._constant(r, tokens, protected, merges, previous, first_layer),
                              lambda prunes: reduction(prunes) >= target, tokens)
        if found is not None:
            return found
        top = reduction(self._constant(tokens, tokens, protected, merges, previous, first_layer))
        raise UsageError(f"token_prune: a FLOPs reduction of {target:.0%} is out of reach; at most {top:.0%} with {tokens} tokens and {len(merges)} layers")
