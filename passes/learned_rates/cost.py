"""Cost models: the fraction of the dense cost a token schedule keeps, differentiable in the per-layer counts.

FLOPs: each block's matmuls, analytic in the tokens its attention sees and the tokens its MLP sees (`block_flops`, with each block's own MLP width), plus what lies outside the blocks (embeddings, pooling) measured
once on the captured dense graph, so the fraction is the one `compress inspect` reports.
"""

from __future__ import annotations

import torch

from compressor.program.token_cost import block_flops, dense_graph_flops


class FlopsCost:
    def __init__(self, handle):
        ad = handle.adapter
        self.hidden = ad.config.hidden_size
        self.widths = [layer.channels for layer in ad.layers]
        tokens = handle.num_tokens
        blocks = sum(block_flops(tokens, tokens, self.hidden, w) for w in self.widths)
        measured = dense_graph_flops(handle) / handle.shapes["batch"]
        self.fixed = max(0.0, measured - blocks)
        self.dense = blocks + self.fixed

    def fraction(self, counts) -> torch.Tensor | float:
        """counts: per layer (tokens entering, tokens after its reduction), ints or straight-through tensors."""
        total = self.fixed
        for (n_in, n_out), width in zip(counts, self.widths):
            total = total + block_flops(n_in, n_out, self.hidden, width)
        return total / self.dense


def hard_counts(prunes: list[int], merges: list[int], tokens: int) -> list[tuple[int, int]]:
    out, n = [], tokens
    for p, r in zip(prunes, merges):
        out.append((n, n - p - r))
        n -= p + r
    return out
