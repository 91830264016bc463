"""What a token schedule costs: FLOPs of the blocks, analytic in the tokens each block's attention and MLP see, plus
what lies outside the blocks (embeddings, pooling) measured once on the captured dense graph, so the fractions are
the ones `compress inspect` reports. One cost model for the token passes' `reduction` targets, learned_rates' search
and the `--budget` planner.
"""

from __future__ import annotations

from dataclasses import dataclass

from compressor.program.capture import capture, graph_stats


def block_flops(n_in: int, n_out: int, hidden: int, ffn: int) -> float:
    """FLOPs of one block whose attention sees n_in tokens and whose MLP sees n_out (matmuls only)."""
    attn = 2 * n_in * 4 * hidden * hidden + 2 * 2 * n_in * n_in * hidden
    return attn + 2 * n_out * 2 * hidden * ffn


def dense_graph_flops(handle) -> int:
    """FLOPs of the dense program's captured graph: the pipeline's baseline when no pass ran before (the model is
    still the one loaded), else captured now."""
    if handle.baseline is not None and not handle.history:
        return handle.baseline.flops
    return graph_stats(capture(handle.program(dense=True), handle.example_inputs())).flops


@dataclass(frozen=True)
class TokenFlops:
    """One sample's FLOPs as a function of the tokens each block sees: every block analytic with its own MLP width
    (width_prune may leave them unequal), plus the measured part outside the blocks. `fraction` is differentiable in
    the counts (learned_rates feeds it straight-through tensors); `reduction` serves the constant-rate searches."""

    what = "FLOPs"  # what `fraction` is a fraction of (not a field)
    tokens: int
    hidden: int
    widths: tuple[int, ...]
    fixed: float  # outside the blocks
    dense: float

    @classmethod
    def of(cls, handle) -> "TokenFlops":
        hidden, tokens = handle.adapter.config.hidden_size, handle.num_tokens
        widths = tuple(layer.channels for layer in handle.adapter.layers)
        blocks = sum(block_flops(tokens, tokens, hidden, w) for w in widths)
        fixed = max(0.0, dense_graph_flops(handle) / handle.shapes["batch"] - blocks)
        return cls(tokens, hidden, widths, fixed, blocks + fixed)

    def fraction(self, counts):
        """The fraction of the dense FLOPs kept; counts: per block (tokens entering, tokens after its reduction),
        ints or tensors."""
        total = self.fixed
        for (n_in, n_out), width in zip(counts, self.widths):
            total = total + block_flops(n_in, n_out, self.hidden, width)
        return total / self.dense

    def reduction(self, taken: list[int]) -> float:
        """The fraction of the dense FLOPs removed when block i takes taken[i] tokens away (dropped and merged alike)."""
        return 1.0 - float(self.fraction(hard_counts([0] * len(taken), taken, self.tokens)))


def hard_counts(prunes: list[int], merges: list[int], tokens: int) -> list[tuple[int, int]]:
    """Per block (tokens entering, tokens left after its pruning and merging)."""
    out, n = [], tokens
    for p, r in zip(prunes, merges):
        out.append((n, n - p - r))
        n -= p + r
    return out


def smallest_rate(schedule_of, meets, limit: int, start: int = 0) -> list[int] | None:
    """The schedule of the smallest rate r in [start, limit) that meets a target (`meets(schedule)`), or None.
    Stops early once the caps bind everywhere (a larger r gives the same schedule, so nothing larger can meet it).
    The constant-rate search behind token_merge's and token_prune's `reduction` and learned_rates' hand schedules."""
    last = None
    for r in range(start, limit):
        schedule = schedule_of(r)
        if meets(schedule):
            return schedule
        if schedule == last:
            return None
        last = schedule
    return None
