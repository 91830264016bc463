"""token_merge: ToMe bipartite soft matching between each block's attention and MLP, at static shapes.

The schedule (tokens merged per layer) is resolved at compile time from `r` (constant, or decaying per layer with
`decay` < 1 to merge early), a per-layer list, or a FLOPs `reduction` target; it is capped so a layer never
merges protected tokens or more than half of the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from compressor.program.capture import capture, graph_stats
from compressor.errors import UsageError
from compressor.program.merging import max_merge
from compressor.pipeline.pass_base import Pass, PassResult, register


@dataclass
class TokenMergeConfig:
    r: int | list[int] | None = field(default=None, metadata={"help": "tokens merged per layer: one int (8 when neither r nor reduction is given), or a list with one per layer"})
    reduction: float | None = field(default=None, metadata={"help": "target FLOPs reduction in (0, 1), e.g. 0.4; the pass picks the smallest constant r reaching it"})
    decay: float = field(default=1.0, metadata={"help": "per-layer factor on r: 1 keeps r constant, 0.5 halves it each layer (front-loaded merging)"})
    proportional_attention: bool = field(default=True, metadata={"help": "add log(token size) to attention logits"})

    def __post_init__(self):
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


def block_flops(n_in: int, n_out: int, hidden: int, ffn: int) -> float:
    """FLOPs of one block whose attention sees n_in tokens and whose MLP sees n_out (matmuls only)."""
    attn = 2 * n_in * 4 * hidden * hidden + 2 * 2 * n_in * n_in * hidden
    return attn + 2 * n_out * 2 * hidden * ffn


def schedule_flops(merges: list[int], tokens: int, hidden: int, ffn: int) -> float:
    total, n = 0.0, tokens
    for r in merges:
        total += block_flops(n, n - r, hidden, ffn)
        n -= r
    return total


def constant_schedule(r: int, tokens: int, layers: int, protected: int, decay: float = 1.0) -> list[int]:
    """r at the first layer, times `decay` per layer after it, capped where the remaining tokens cannot give it."""
    out, n = [], tokens
    for i in range(layers):
        step = min(int(round(r * decay ** i)), max_merge(n, protected))
        out.append(step)
        n -= step
    return out


@register
class TokenMerge(Pass):
    name = "token_merge"
    summary = "ToMe token merging (bipartite soft matching) with size-weighted averages and proportional attention"
    Config = TokenMergeConfig
    requires = frozenset({"encoder"})
    ensures = frozenset({"token_plan"})

    def run(self, handle) -> PassResult:
        cfg: TokenMergeConfig = self.config
        layers, tokens = handle.num_layers, handle.num_tokens
        protected = handle.adapter.protected_per_sample
        if isinstance(cfg.r, list):
            merges = self._checked_list(cfg.r, tokens, layers, protected)
        elif cfg.r is not None:
            merges = constant_schedule(cfg.r, tokens, layers, protected, cfg.decay)
        else:
            merges = self._for_reduction(handle, cfg.reduction, tokens, layers, protected, cfg.decay)
        # the plan composes with an earlier token_merge: merges add up per layer
        previous = handle.plan.merges or [0] * layers
        combined = [a + b for a, b in zip(previous, merges)]
        self._checked_list(combined, tokens, layers, protected)
        handle.plan.merges = combined
        handle.plan.proportional_attention = cfg.proportional_attention
        counts = handle.plan.token_counts(tokens, layers)
        return PassResult(modified=any(merges), info={"schedule": combined, "token_counts": counts})

    @staticmethod
    def _checked_list(merges: list[int], tokens: int, layers: int, protected: int) -> list[int]:
        if len(merges) != layers:
            raise UsageError(f"token_merge: r lists one value per layer; this model has {layers} layers, got {len(merges)}")
        n = tokens
        for i, r in enumerate(merges):
            cap = max_merge(n, protected)
            if r > cap:
                raise UsageError(f"token_merge: layer {i} would merge {r} tokens but at most {cap} of its {n} may merge; lower r")
            n -= r
        return list(merges)

    def _for_reduction(self, handle, target: float, tokens: int, layers: int, protected: int, decay: float) -> list[int]:
        """Smallest first-layer r whose FLOPs (blocks analytic, the rest measured on the captured graph) meet target."""
        c = handle.adapter.config
        blocks = handle.adapter.layers  # widths may differ per block after width_prune: the mean stands in
        hidden, ffn = c.hidden_size, sum(l.channels for l in blocks) // len(blocks)
        dense_blocks = schedule_flops([0] * layers, tokens, hidden, ffn)
        measured = graph_stats(capture(handle.program(dense=True), handle.example_inputs())).flops / handle.shapes["batch"]
        fixed = max(0.0, measured - dense_blocks)
        dense = dense_blocks + fixed
        best = None
        for r in range(0, tokens):
            merges = constant_schedule(r, tokens, layers, protected, decay)
            got = 1.0 - (schedule_flops(merges, tokens, hidden, ffn) + fixed) / dense
            if got >= target:
                best = merges
                break
            if r > 0 and merges == constant_schedule(r - 1, tokens, layers, protected, decay):
                break  # caps bind everywhere: larger r changes nothing
        if best is None:
            most = constant_schedule(tokens, tokens, layers, protected, decay)
            top = 1.0 - (schedule_flops(most, tokens, hidden, ffn) + fixed) / dense
            raise UsageError(f"token_merge: a FLOPs reduction of {target:.0%} is out of reach; at most {top:.0%} with {tokens} tokens and {layers} layers")
        return best
