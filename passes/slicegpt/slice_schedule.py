"""Non-uniform SliceGPT widths chosen from each residual boundary's eigen-spectrum.

A boundary whose variance is concentrated in few directions loses little when cut hard; one whose variance is
spread loses more. With the eigenvalues of each boundary's per-token normalised second moment, cutting boundary k
to width w loses the fraction err_k(w) = 1 - (sum of the top w eigenvalues) / trace of each token's energy, on
average (the norm that reads the boundary rescales every token, so a token's relative error is what matters).
The widths minimise sum_k err_k(w_k) for the uniform schedule's total width: since eigenvalues descend, each
err_k is convex in w, so a greedy allocation, round_to dimensions at a time, is optimal. The total width is kept,
not the parameter count: boundaries differ in cost (a dimension of the embedding's output is a vocabulary row), so
the pass reports the parameters it ends with. (Budgeting parameters instead starves the embedding's output, which
measured far worse.)
"""

from __future__ import annotations

import heapq

import torch


def spectrum_widths(spectra: list[torch.Tensor], target: int, round_to: int, low: int, high: int) -> list[int]:
    """Widths (multiples of round_to within [low, high]) summing to len(spectra) * target that lose the least
    energy in total: greedy, round_to dimensions at a time, to the boundary whose next directions keep the most."""
    if not low <= target <= high or low % round_to or high % round_to or target % round_to:
        raise ValueError(f"need round_to-aligned low <= target <= high, got {low}, {target}, {high} (round_to {round_to})")
    energies = [v.double().clamp(min=0) for v in spectra]
    cumulative = [torch.cat([torch.zeros(1, dtype=torch.float64), (e / e.sum().clamp(min=1e-300)).cumsum(0)]) for e in energies]
    widths = [low] * len(spectra)

    def gain(k: int) -> float:
        return float(cumulative[k][widths[k] + round_to] - cumulative[k][widths[k]])

    heap = [(-gain(k), k) for k in range(len(spectra)) if low < high]
    heapq.heapify(heap)
    for _ in range(len(spectra) * (target - low) // round_to):
        _, k = heapq.heappop(heap)
        widths[k] += round_to
        if widths[k] < high:
            heapq.heappush(heap, (-gain(k), k))
    return widths


def lost_energy(spectrum: torch.Tensor, width: int) -> float:
    """Fraction of the energy outside the top `width` eigen-directions."""
    v = spectrum.double().clamp(min=0)
    return float(1 - v[:width].sum() / v.sum().clamp(min=1e-300))
