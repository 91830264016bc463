"""Compensation for removed heads and channels, on the output projection that reads them, from the dense model's
input statistics of that projection (collected by `importance.calibrate`).

- `bias` (FLAP): the removed units' mean contribution W[:, R] mean(x_R) moves into the output bias.
- `least_squares` (after Kwon et al.'s layer-wise reconstruction): the kept columns and the bias are refitted so
  that W' x_K + b' best matches the dense W x + b over the calibration tokens, in closed form from the Gram matrix
  of the inputs, with a ridge term that pulls the refitted columns towards their old values (towards zero, the fit
  overfits the rare large activations that the removed units had and generalises worse than no compensation):
  a scale per kept unit, as Kwon solves for, is a special case of this fit.
"""

from __future__ import annotations

import torch
from torch import nn

from .importance import InputStats


def compensated(lin: nn.Linear, kept: torch.Tensor, stats: InputStats, method: str, damping: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New (weight over the kept input columns, bias) of `lin`; `kept` indexes its current input columns."""
    w = lin.weight.double()
    bias = lin.bias.double() if lin.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    if method == "none":
        return w[:, kept].float(), (None if lin.bias is None else lin.bias.detach().clone())
    removed = torch.ones(w.shape[1], dtype=torch.bool)
    removed[kept] = False
    if method == "bias":
        return w[:, kept].float(), (bias + w[:, removed] @ stats.mean[removed]).float()
    g, s, n = stats.gram, stats.total, stats.count
    k = len(kept)
    a = torch.zeros(k + 1, k + 1, dtype=torch.float64)
    a[:k, :k] = g[kept][:, kept]
    a[:k, k] = a[k, :k] = s[kept]
    a[k, k] = n
    ridge = damping * a[:k, :k].diagonal().mean().clamp(min=1e-12)
    a[:k, :k] += torch.eye(k, dtype=torch.float64) * ridge
    rhs = torch.cat([g[kept] @ w.T + ridge * w[:, kept].T, (s @ w.T)[None]], 0)  # ridge pulls towards the old weights
    x = torch.linalg.solve(a, rhs)
    return x[:k].T.float().contiguous(), (bias + x[k]).float()


def set_projection(lin: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    lin.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    lin.bias = None if bias is None else nn.Parameter(bias.contiguous(), requires_grad=False)
    lin.out_features, lin.in_features = weight.shape
