"""PCA of residual-stream activations for SliceGPT: second moments accumulated in float64, damped eigenvectors."""

from __future__ import annotations

import torch


def second_moment(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Sum of x x^T over every token (a float32 product returned in float64, so sums over batches accumulate in
    float64); with `normalize`, of each token scaled to unit norm, so a few massive-activation tokens do not decide
    the rotation alone."""
    x = x.reshape(-1, x.shape[-1]).float()
    if normalize:
        x = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    return (x.T @ x).double()


def normalized_spectrum(xs: list[torch.Tensor]) -> torch.Tensor:
    """Eigenvalues, descending, of the per-token normalised second moment of a list of activation batches: the
    spectrum shape that the per_layer width schedule reads."""
    return torch.linalg.eigvalsh(sum(second_moment(x, True) for x in xs)).flip(0)


def pca_rotation(moment: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors of the second moment plus `damping` x its mean eigenvalue on the diagonal, by
    descending eigenvalue (float64)."""
    damp = damping * moment.diagonal().mean()
    values, vectors = torch.linalg.eigh(moment + damp * torch.eye(moment.shape[0], dtype=moment.dtype))
    order = values.argsort(descending=True)
    return values[order], vectors[:, order]


def pca_keeping(damping: float, kept: list[float]):
    """pca(moment, keep): the first `keep` eigenvectors (float32), appending the fraction of variance kept to `kept`."""
    def pca(moment: torch.Tensor, keep: int) -> torch.Tensor:
        values, q = pca_rotation(moment, damping)
        kept.append(float(values[:keep].sum() / values.sum()))
        return q[:, :keep].float()
    return pca
