"""A latency budget for learned_rates: a per-block latency table measured on this machine's onnxruntime, used by the
search as its cost model in place of FLOPs (Kwon et al., "A Fast Post-Training Pruning Framework for Transformers",
2022, fit such tables piecewise-linearly).

Every distinct block shape (heads, MLP channels) has its attention (up to the merge point) and its MLP exported once
with a dynamic token axis and timed at a grid of token counts at the compiled batch; between grid points the table is
linear, and made non-decreasing (timing noise must not make fewer tokens cost more). What lies outside the blocks
(embeddings, pooling) is the dense program's measured latency minus its blocks at full length; the matching of
merged tokens is in no table, so the check on the compiled graph below corrects for it. `LatencyTable.fraction` has TokenFlops's interface, so the projection onto the budget, the hand schedules
and the penalty read it unchanged. After the search the compiled schedule is timed against the dense program; while
it misses the budget by more than the latency tolerance (`ctx.latency.tolerance`) the table's target becomes its prediction for that schedule
scaled by what was measured (predicted x budget / measured) and the learned rates are tilted to it (no new search). The manifest records the table,
the prediction and every measurement. The timings come from the pass context's `ctx.latency` (onnxruntime).
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from compressor.program.encoder import TokenPlan

MAX_CORRECTION = 1.3  # a re-target moves the table's target by at most this factor
GRID_POINTS = 9  # token counts each block part is timed at, from the fewest a schedule can keep to all


class _Attention(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer.layer  # registered, so export sees the weights
        self.adapter = layer

    def forward(self, x, bias):
        return self.adapter.attention(x, bias).x


class _Mlp(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer.layer
        self.adapter = layer

    def forward(self, x):
        return self.adapter.mlp(x)


def interpolate(xs: tuple[int, ...], ys: tuple[float, ...], n):
    """Piecewise-linear ys at n (int or tensor; differentiable in a tensor), extrapolated on the end segments."""
    at = float(n.detach()) if isinstance(n, torch.Tensor) else float(n)
    i = max(0, min(len(xs) - 2, bisect.bisect_right(xs, at) - 1))
    return ys[i] + (ys[i + 1] - ys[i]) * (n - xs[i]) / (xs[i + 1] - xs[i])


@dataclass(frozen=True)
class LatencyTable:
    """ms of one forward at the compiled batch as a function of the tokens each block sees."""

    what = "dense latency"  # what `fraction` is a fraction of (not a field)
    grid: tuple[int, ...]
    attention: tuple[tuple[float, ...], ...]  # per block: ms at each grid count
    mlp: tuple[tuple[float, ...], ...]
    fixed: float  # outside the blocks
    dense: float  # measured dense latency

    @classmethod
    def measure(cls, handle, latency, threads: int, floor: int, track=lambda items, _description: items) -> "LatencyTable":
        """Time every distinct block shape with `latency` (`ctx.latency`), reporting progress through `track`."""
        ad, tokens, batch = handle.adapter, handle.num_tokens, handle.shapes["batch"]
        grid = tuple(sorted({int(round(v)) for v in np.linspace(floor, tokens, GRID_POINTS)}))
        x = torch.randn(batch, tokens, ad.config.hidden_size, generator=torch.Generator().manual_seed(0))
        bias = torch.zeros(batch, tokens)
        shapes: dict[tuple[int, int], tuple[tuple[float, ...], tuple[float, ...]]] = {}
        for layer in track(ad.layers, "timing block latency tables"):
            key = (layer.heads, layer.channels)
            if key not in shapes:
                att = latency.time_module_at_sizes(_Attention(layer), (x, bias), list(grid), threads=threads)
                mlp = latency.time_module_at_sizes(_Mlp(layer), (x,), list(grid), threads=threads)
                shapes[key] = tuple(np.maximum.accumulate(att).tolist()), tuple(np.maximum.accumulate(mlp).tolist())
        per_block = [shapes[(l.heads, l.channels)] for l in ad.layers]
        dense = latency.time_handles({"dense": dataclasses.replace(handle, plan=TokenPlan())}, threads=threads)["dense"]
        blocks = sum(a[-1] + m[-1] for a, m in per_block)
        return cls(grid, tuple(a for a, _ in per_block), tuple(m for _, m in per_block), dense - blocks, dense)

    def ms(self, counts):
        total = self.fixed
        for (n_in, n_out), att, mlp in zip(counts, self.attention, self.mlp):
            total = total + interpolate(self.grid, att, n_in) + interpolate(self.grid, mlp, n_out)
        return total

    def fraction(self, counts):
        """The predicted fraction of the dense latency kept; counts: per block (tokens entering, tokens after its
        reduction), ints or tensors."""
        return self.ms(counts) / self.dense

    def record(self) -> dict:
        shapes = list(dict.fromkeys(zip(self.attention, self.mlp)))
        return {"grid": list(self.grid), "fixed_ms": round(self.fixed, 3), "dense_ms": round(self.dense, 3),
                "shapes": [{"blocks": [i for i, t in enumerate(zip(self.attention, self.mlp)) if t == shape],
                            "attention_ms": [round(v, 3) for v in shape[0]], "mlp_ms": [round(v, 3) for v in shape[1]]}
                           for shape in shapes]}


def measured_ratio(handle, latency, threads: int) -> dict:
    """The compiled schedule's latency against the dense program's, timed interleaved (`latency`: `ctx.latency`)."""
    dense = dataclasses.replace(handle, plan=TokenPlan())
    ms = latency.time_handles({"dense": dense, "learned": handle}, threads=threads)
    return {"check_ms": {k: round(v, 3) for k, v in ms.items()}, "measured_ratio": round(ms["learned"] / ms["dense"], 4)}


def retarget(attempts: list[dict], keep: float, tolerance: float, most: int) -> float | None:
    """The next target of the table, or None when the last measurement is within `tolerance` of the budget (or the
    `most` attempts are spent): the table's prediction for the last schedule, scaled by what that schedule measured
    (by at most MAX_CORRECTION either way). The pass then keeps the attempt that measured closest to the budget."""
    last = attempts[-1]
    if abs(last["measured_ratio"] / keep - 1) <= tolerance or len(attempts) >= most:
        return None
    correction = min(max(keep / last["measured_ratio"], 1 / MAX_CORRECTION), MAX_CORRECTION)  # one noisy timing
    target = last["predicted_ratio"] * correction
    return target if 0.0 < target < 1.0 else None
