"""tie_head: after portable slicing, the LM head shares the embedding again (vocab x width parameters saved)."""

from __future__ import annotations

import torch
from torch import nn

from compressor.passes.slicegpt.pca import second_moment


@torch.no_grad()
def tie_head(adapter, samples: torch.Tensor, batch: int) -> float:
    """Share the embedding with the LM head again after portable slicing; returns the relative logit error left.

    Folding the final norm's scale g made the head E diag(g) Q_d, which the embedding E Q_d cannot express; the
    head becomes E Q_d diag(h) instead, with h (the final norm's new weight) fitted by least squares on the logits:
    h = argmin E||E_d diag(h) z - H z||^2 over the final norm's outputs z, i.e. (G o C) h = diag(E_d^T H C) with
    G = E_d^T E_d and C = E[z z^T]. A recovery step (the distill pass) trains away what remains.
    """
    norm, head, emb = adapter.residual_norms[-1], adapter.lm_head, adapter.embed_tokens
    d = emb.weight.shape[1]
    c = torch.zeros(d, d, dtype=torch.float64)
    handle = norm.register_forward_hook(lambda _m, _a, out: c.add_(second_moment(out, False)))
    try:
        for ids in torch.split(samples, batch):
            adapter.calibration_forward(ids)
    finally:
        handle.remove()
    e, h_untied = emb.weight.double(), head.weight.double()
    g = e.T @ e
    cross = e.T @ h_untied
    h = torch.linalg.solve(g * c, (cross @ c).diagonal())
    total = torch.trace(h_untied.T @ h_untied @ c)  # E||H z||^2
    left = torch.trace((torch.diag(h) @ g @ torch.diag(h) - 2 * torch.diag(h) @ cross) @ c) + total
    norm.weight = nn.Parameter((norm.weight.double() * h).float(), requires_grad=False)
    head.weight = emb.weight
    adapter.model.config.tie_word_embeddings = True
    return float((left.clamp(min=0) / total).sqrt())
