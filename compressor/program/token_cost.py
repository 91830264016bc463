"""What a token schedule costs: FLOPs of the blocks, analytic in the tokens each block's attention and MLP see, plus
what lies outside the blocks (embeddings, pooling) measured once on the captured dense graph, so the fractions are
the ones `compress inspect` reports. Shared by the token passes' `reduction` targets and the `--budget` planner.
"""

from __future__ import annotations

from dataclasses import dataclass

from compressor.program.capture import capture, graph_stats


def block_flops(n_in: int, n_out: int, hidden: int, ffn: int) -> float:
    """FLOPs of one block whose attention sees n_in tokens and whose MLP sees n_out (matmuls only)."""
    attn = 2 * n_in * 4 * hidden * hidden + 2 * 2 * n_in * n_in * hidden
    return attn + 2 * n_out * 2 * hidden * ffn


def schedule_flops(taken: list[int], tokens: int, hidden: int, ffn: int) -> float:
    """FLOPs of the blocks when layer i removes taken[i] tokens (dropped and merged alike) before its MLP."""
    total, n = 0.0, tokens
    for r in taken:
        total += block_flops(n, n - r, hidden, ffn)
        n -= r
    return total


def dense_graph_flops(handle) -> int:
    """FLOPs of the dense program's captured graph: the pipeline's baseline when no pass ran before (the model is
    still the one loaded), else captured now."""
    if handle.baseline is not None and not handle.history:
        return handle.baseline.flops
    return graph_stats(capture(handle.program(dense=True), handle.example_inputs())).flops


@dataclass(frozen=True)
class TokenFlops:
    """One sample's FLOPs as a function of the per-layer tokens taken; block widths may differ after width_prune,
    so the mean MLP width stands in for the blocks'."""

    tokens: int
    hidden: int
    ffn: int
    fixed: float  # outside the blocks
    dense: float

    @classmethod
    def of(cls, handle) -> "TokenFlops":
        blocks = handle.adapter.layers
        hidden, ffn, tokens = handle.adapter.config.hidden_size, sum(l.channels for l in blocks) // len(blocks), handle.num_tokens
        dense_blocks = schedule_flops([0] * len(blocks), tokens, hidden, ffn)
        fixed = max(0.0, dense_graph_flops(handle) / handle.shapes["batch"] - dense_blocks)
        return cls(tokens, hidden, ffn, fixed, dense_blocks + fixed)

    def reduction(self, taken: list[int]) -> float:
        """The fraction of the dense FLOPs a schedule removes."""
        return 1.0 - (schedule_flops(taken, self.tokens, self.hidden, self.ffn) + self.fixed) / self.dense
