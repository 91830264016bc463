"""Calibration inputs for learned_rates, how they are split between its stages, and the two ways a schedule is judged
on them: the search's differentiable distillation loss, and the compiled program's pooled cosine (starts, exchanges,
final choice)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compressor.errors import UsageError
from compressor.models import PAD
from compressor.program.encoder import EncoderProgram, TokenPlan

from .exchange import TokenSchedule
from .search import EPS

SELECTION = 64  # calibration inputs held out of the steps and the exchanges: they choose the final schedule


def calibration_split(cfg) -> tuple[int, int, int]:
    """Rows of the calibration inputs: [0, held) choose the final schedule, [held, held + polish) score the hand
    starts and the exchanges, the gradient steps draw from the rest (from `held` on, overlapping the exchange rows,
    only when fewer than one batch would be left)."""
    n = cfg.calibration_samples
    held = max(1, min(SELECTION, n // 4))
    polish = max(1, min(cfg.exchange_samples, n - held - cfg.batch))
    steps_from = held + polish if n - held - polish >= cfg.batch else held
    return held, polish, steps_from


def calibration(handle, data, cfg):
    """Calibration inputs (from `data`, the pass context's `ctx.calibration`) and the dense model's (pooled, final
    hidden states) on them."""
    from compressor.passes.distill.encoder import random_lengths
    from compressor.passes.pruning.calibration import calibration_batches

    try:
        (inputs,) = calibration_batches(data, cfg.calibration_samples, cfg.calibration_samples, seed=cfg.seed)
    except UsageError as e:
        raise UsageError(f"learned_rates: {e}") from None
    if handle.target.text:  # short inputs too, where padding merges first
        inputs = random_lengths(handle.adapter, inputs, torch.Generator().manual_seed(cfg.seed))
    dense = EncoderProgram(handle.adapter, TokenPlan())
    pooled, hidden = [], []
    with torch.no_grad():
        for i in range(0, cfg.calibration_samples, 16):
            out = dense.encode(*(t[i:i + 16] for t in inputs))
            pooled.append(out.pooled)
            hidden.append(out.hidden)
    return inputs, (torch.cat(pooled), torch.cat(hidden))


def distill_loss(pooled, stream, t_pooled, t_hidden, hidden_weight: float) -> torch.Tensor:
    """1 - cosine of the pooled outputs, plus `hidden_weight` x the MSE between per-token standardised final hidden
    states of the live tokens (the teacher's averaged over the input tokens each one holds). The token weights are
    not differentiated: dropping a token must not lower the loss by hiding its error."""
    loss = 1.0 - F.cosine_similarity(pooled, t_pooled, dim=-1).mean()
    if not hidden_weight:
        return loss
    t = stream.groups @ t_hidden / stream.groups.sum(dim=-1, keepdim=True).clamp(min=EPS)
    c = t.shape[-1:]
    err = (F.layer_norm(stream.x, c) - F.layer_norm(t, c)).pow(2).mean(dim=-1)
    w = (stream.size[..., 0] * stream.mask * (stream.kinds != PAD)).detach()
    return loss + hidden_weight * (err * w).sum() / w.sum().clamp(min=1.0)


def pooled_score(ad, inputs, t_pooled, rows, proportional: bool):
    """schedule -> 1 - mean cosine of the compiled program's pooled output to the dense model's on these calibration
    inputs: what the starts, the exchanges and the final choice are judged by."""
    rows = list(rows)

    def score(s: TokenSchedule) -> float:
        program = EncoderProgram(ad, TokenPlan(merges=list(s.merges), prunes=list(s.prunes) if any(s.prunes) else [],
                                               proportional_attention=proportional))
        total = 0.0
        with torch.no_grad():
            for i in range(0, len(rows), 16):
                idx = torch.tensor(rows[i:i + 16])
                out = program.encode(*(t[idx] for t in inputs)).pooled
                total += F.cosine_similarity(out, t_pooled[idx], dim=-1).sum().item()
        return 1.0 - total / len(rows)
    return score
