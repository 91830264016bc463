"""Learnable kept-token counts: per layer, a distribution over candidate counts (DiffRate's differentiable proxy).

Candidates are absolute kept counts N, N - g, N - 2g, ... (as in DiffRate), the same for every layer; a layer's count
is the expectation rounded up (ceil with a straight-through gradient), then capped by the tokens it receives, so
the schedule is monotone by construction. `survival` turns the distribution into a per-rank mask: the token ranked
j (0 = most important) survives with probability P(count > j); its hard value (j < count) is used forward and the
probability's gradient backward (straight-through), so the loss can tell each layer's rate which tokens mattered.
"""

from __future__ import annotations

import torch
from torch import nn


class KeptCounts(nn.Module):
    def __init__(self, layers: int, tokens: int, floor: int, granularity: int):
        super().__init__()
        counts = list(range(tokens, floor - 1, -granularity))
        if counts[-1] != floor:
            counts.append(floor)
        self.register_buffer("candidates", torch.tensor(counts, dtype=torch.float32))
        self.granularity = granularity
        self.logits = nn.Parameter(torch.zeros(layers, len(counts)))  # uniform, DiffRate's initialisation

    @torch.no_grad()
    def start_at(self, kept: list[int]) -> None:
        """Centre each layer's distribution on a kept count (a warm start: DiffRate's uniform start needs epochs of
        ImageNet; a few hundred calibration inputs move a good schedule, not a random one)."""
        target = torch.tensor(kept, dtype=torch.float32)[:, None]
        self.logits.copy_(-(self.candidates[None] - target).abs() / self.granularity)

    def probabilities(self, tilt: float = 0.0) -> torch.Tensor:
        """(layers, candidates); a positive `tilt` shifts every layer's mass towards fewer tokens."""
        steps = torch.arange(len(self.candidates), dtype=torch.float32)
        return (self.logits + tilt * steps).softmax(dim=-1)

    def expected(self, tilt: float = 0.0) -> torch.Tensor:
        """Expected kept count per layer, rounded up with a straight-through gradient (DiffRate's ste_ceil)."""
        e = self.probabilities(tilt) @ self.candidates
        return e + (torch.ceil(e - 1e-4) - e).detach()

    def survival(self, layer: int, ranks: torch.Tensor, kept: int, tilt: float = 0.0) -> torch.Tensor:
        """Straight-through mask for tokens of these ranks when `kept` tokens (the capped hard count) survive."""
        p = self.probabilities(tilt)[layer]
        prob = (p * (self.candidates > ranks[..., None].float())).sum(dim=-1)
        hard = (ranks < kept).float()
        return hard - prob.detach() + prob
