"""token_merge: ToMe bipartite soft matching (or PiToMe's energy-ranked matching) between each block's attention
and MLP, at static shapes.

The schedule (tokens merged per layer) is resolved at compile time from `r` (constant, or decaying per layer with
`decay` < 1 to merge early), a per-layer list, or a FLOPs `reduction` target; it is capped so a layer never
merges protected tokens or more than half of the rest (counted after an earlier token_prune's drops).

`method = "pitome"` (Tran et al., NeurIPS 2024) merges only the 2r highest-energy tokens (those with many close
neighbours), so isolated, informative tokens are protected; `method = "pitome_text"` ranks by the reference code's
text energy (a Gaussian kernel of 1 - cos) instead of the vision ELU; see compressor/program/merging.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from compressor.program.token_cost import TokenFlops, smallest_rate
from compressor.errors import UsageError
from compressor.program.encoder import MERGE_METHODS
from compressor.program.merging import max_merge
from compressor.program.pruning import MIN_KEPT, max_prune
from compressor.pipeline.pass_base import Pass, PassResult, register


@dataclass
class TokenMergeConfig:
    r: int | list[int] | None = field(default=None, metadata={"help": "tokens merged per layer: one int (8 when neither r nor reduction is given), or a list with one per layer"})
    reduction: float | None = field(default=None, metadata={"help": "target FLOPs reduction in (0, 1), e.g. 0.4; the pass picks the smallest constant r reaching it"})
    decay: float = field(default=1.0, metadata={"help": "per-layer factor on r: 1 keeps r constant, 0.5 halves it each layer (front-loaded merging)"})
    proportional_attention: bool = field(default=True, metadata={"help": "add log(token size) to attention logits"})
    method: str = field(default="tome", metadata={"help": "tome (bipartite matching over all tokens), pitome (only the 2r highest-energy tokens merge; ELU energy, the paper's vision variant) or pitome_text (the same with its text variant's Gaussian energy)"})

    def __post_init__(self):
        if self.method not in MERGE_METHODS:
            raise ValueError(f"method must be one of {', '.join(MERGE_METHODS)}, got {self.method!r}")
        if self.r is not None and self.reduction is not None:
            raise ValueError("give either r or reduction, not both")
        if self.r is None and self.reduction is None:
            self.r = 8
        if isinstance(self.r, int) and self.r < 0 or isinstance(self.r, list) and any(v < 0 for v in self.r):
            raise ValueError(f"r must be non-negative, got {self.r}")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay must lie in (0, 1], got {self.decay}")
        if self.reduction is not None and not 0.0 < self.reduction < 1.0:
            raise ValueError(f"reduction must lie strictly between 0 and 1, got {self.reduction}")


def constant_schedule(r: int, tokens: int, layers: int, protected: int, decay: float = 1.0,
                      removed: list[int] | None = None, drops: list[int] | None = None) -> list[int]:
    """r at the first layer, times `decay` per layer after it, capped where the remaining tokens cannot give it;
    `removed` are tokens the plan already takes away per layer before this merge (drops, earlier merges), and
    room is left for the `drops` of token_prune in later layers."""
    out, n = [], tokens
    for i in range(layers):
        before = removed[i] if removed else 0
        cap = max_merge(n - before, protected)
        if drops and any(drops[i + 1:]):
            cap = max(0, min(cap, n - before - protected - MIN_KEPT - sum(drops[i + 1:])))
        step = min(int(round(r * decay ** i)), cap)
        out.append(step)
        n -= step + before
    return out


@register
class TokenMerge(Pass):
    name = "token_merge"
    summary = "ToMe token merging (bipartite soft matching) with size-weighted averages and proportional attention"
    Config = TokenMergeConfig
    requires = frozenset({"encoder"})
    ensures = frozenset({"token_plan"})

    def run(self, handle, ctx) -> PassResult:
        cfg: TokenMergeConfig = self.config
        layers, tokens = handle.num_layers, handle.num_tokens
        protected = handle.adapter.protected_per_sample
        plan = handle.plan
        if any(plan.merges) and plan.merge_method != cfg.method:
            raise UsageError(f"token_merge: the plan already merges with {plan.merge_method}; one model uses one method, not {cfg.method} too")
        # the plan composes with an earlier token_merge (merges add up per layer) and token_prune (drops come first)
        previous = plan.merges or [0] * layers
        drops = plan.prunes or [0] * layers
        taken = [p + m for p, m in zip(drops, previous)]
        if isinstance(cfg.r, list):
            merges = self._checked_list(cfg.r, tokens, layers, protected)
        elif cfg.r is not None:
            merges = constant_schedule(cfg.r, tokens, layers, protected, cfg.decay, taken, drops)
        else:
            merges = self._for_reduction(handle, cfg.reduction, tokens, layers, protected, cfg.decay, taken, drops)
        combined = [a + b for a, b in zip(previous, merges)]
        self._checked_list(combined, tokens, layers, protected, drops)
        plan.merges = combined
        plan.merge_method = cfg.method
        plan.proportional_attention = cfg.proportional_attention
        counts = plan.token_counts(tokens, layers)
        return PassResult(modified=any(merges), info={"schedule": combined, "method": cfg.method, "token_counts": counts})

    @staticmethod
    def _checked_list(merges: list[int], tokens: int, layers: int, protected: int, drops: list[int] | None = None) -> list[int]:
        if len(merges) != layers:
            raise UsageError(f"token_merge: r lists one value per layer; this model has {layers} layers, got {len(merges)}")
        n = tokens
        for i, r in enumerate(merges):
            p = drops[i] if drops else 0
            if p > max_prune(n, protected):
                raise UsageError(f"token_merge: layer {i} would have {n} tokens left, too few for the {p} that token_prune drops there; lower r")
            n -= p
            cap = max_merge(n, protected)
            if r > cap:
                raise UsageError(f"token_merge: layer {i} would merge {r} tokens but at most {cap} of its {n} may merge; lower r")
            n -= r
        return list(merges)

    def _for_reduction(self, handle, target: float, tokens: int, layers: int, protected: int, decay: float,
                       taken: list[int], drops: list[int]) -> list[int]:
        """Smallest first-layer r whose FLOPs (blocks analytic, the rest measured on the captured graph) meet target."""
        cost = TokenFlops.of(handle)
        reduction = lambda merges: cost.reduction([m + t for m, t in zip(merges, taken)])  # noqa: E731
        best = smallest_rate(lambda r: constant_schedule(r, tokens, layers, protected, decay, taken, drops),
                             lambda merges: reduction(merges) >= target, tokens)
        if best is None:
            most = constant_schedule(tokens, tokens, layers, protected, decay, taken, drops)
            top = reduction(most)
            raise UsageError(f"token_merge: a FLOPs reduction of {target:.0%} is out of reach; at most {top:.0%} with {tokens} tokens and {layers} layers")
        return best
