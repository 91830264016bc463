"""Token streams for language models: calibration windows (the Wikipedia extract's calibration articles, or the user's
`[data] calibration` text) and perplexity windows (its held-out articles)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from compressor.errors import UsageError
from compressor.sources.wiki import wiki_split


def tokenize_plain(tokenizer_file: str | Path, texts: list[str]) -> np.ndarray:
    """Concatenate texts (blank line between) and tokenize without special tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    return np.array(tok.encode("\n\n".join(texts), add_special_tokens=False).ids, dtype=np.int64)


def calibration_windows(tokenizer_file, samples: int, length: int, seed: int = 42, source=None,
                        option: str = "calibration_samples", length_option: str = "calibration_len") -> torch.Tensor:
    """`samples` windows of `length` tokens at random offsets (seeded) in the calibration articles, or in the user's
    calibration text (`source`, a data.CalibrationData), which must hold at least samples x length tokens."""
    if source is None:
        calibration, _ = wiki_split()
        ids = tokenize_plain(tokenizer_file, calibration)
    else:
        ids = tokenize_plain(tokenizer_file, [source.text()])
        need = samples * length
        if len(ids) < max(need, length + 1):
            raise UsageError(f"[data] calibration '{source.path}' holds {len(ids):,} tokens; {option} x {length_option} = "
                             f"{samples} x {length} = {need:,} asks for more: add text or lower them")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - length, size=samples)
    return torch.from_numpy(np.stack([ids[s:s + length] for s in starts]))


def perplexity_windows(ids: np.ndarray, length: int = 512, limit: int | None = None) -> np.ndarray:
    """Non-overlapping windows of `length` tokens (the ragged tail is dropped)."""
    n = len(ids) // length
    if limit is not None:
        n = min(n, limit)
    return ids[: n * length].reshape(n, length)


def held_out_windows(tokenizer_file, length: int = 512, limit: int | None = None) -> np.ndarray:
    _, held_out = wiki_split()
    return perplexity_windows(tokenize_plain(tokenizer_file, held_out), length, limit)


def nll_sum(logits: np.ndarray | torch.Tensor, ids: np.ndarray | torch.Tensor) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods over a batch of windows, and the number of predicted tokens."""
    logits = torch.as_tensor(logits, dtype=torch.float32)[:, :-1]
    target = torch.as_tensor(ids)[:, 1:]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, target[..., None])[..., 0]
    return float(-logp.double().sum()), int(target.numel())


def torch_perplexity(logits_fn, windows: np.ndarray, batch: int = 2) -> float:
    """exp(mean NLL) over all predicted tokens; logits_fn maps a (B, L) LongTensor to (B, L, V) logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            ids = torch.from_numpy(windows[i:i + batch])
            s, n = nll_sum(logits_fn(ids), ids)
            total, count = total + s, count + n
    return float(np.exp(total / count))
