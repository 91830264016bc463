"""Real inputs at the compiled shapes: probe batches for pass checks, held-out batches for validation.

Pre-processing is the runtime's own (tokenizer, resize/normalise), so the compiler validates what users will feed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from compressor.runtime.preprocess import ImagePreprocessor, TextPreprocessor

from compressor.errors import UsageError
from compressor.sources import data


def preprocessor(handle):
    pre = handle.adapter.preprocess_config(handle.shapes)
    if pre["kind"] == "text":
        return TextPreprocessor(Path(handle.adapter.folder) / pre["tokenizer"], handle.shapes["seq_len"], pre["pad_id"])
    return ImagePreprocessor.from_config(pre)


def wiki_windows(count: int, words: int) -> list[str]:
    """`count` held-out Wikipedia passages of `words` words (at least as many tokens: they fill a compiled length of
    `words`), taken round-robin over the held-out articles (never the calibration ones) so that topics vary."""
    from compressor.sources.wiki import wiki_split

    per_article = [t.split() for t in wiki_split()[1]]
    out, k = [], 0
    while len(out) < count:
        chunks = [" ".join(a[k * words:(k + 1) * words]) for a in per_article if len(a) >= (k + 1) * words]
        if not chunks:
            raise UsageError(f"the held-out Wikipedia text holds fewer than {count} passages of {words} words")
        out.extend(chunks)
        k += 1
    return out[:count]


def validation_texts(count: int, seq_len: int) -> list[str]:
    """Texts that fill the compiled length, so that token merging merges real tokens: held-out Wikipedia passages.
    (Short sentences leave most of the sequence as padding, which merges first and hides what merging costs.)"""
    return wiki_windows(count, seq_len)


def raw_samples(handle, part: str, count: int, source: str | None = None) -> list:
    """`count` texts or images: from the user's file/folder if given, else the bundled real data sets (validation
    texts fill the compiled length; probe texts are Lee background sentences)."""
    if handle.adapter.modality == "text":
        if source:
            texts = data.read_text_file(source)
        elif part == "validation":
            texts = validation_texts(count, handle.shapes["seq_len"])
        else:
            texts = data.text_split(part, count)
        return (texts * (count // len(texts) + 1))[:count]
    if source:
        return data.read_image_folder(source, count)
    return data.image_split(part, count)


def feed_batches(handle, part: str, count: int, source: str | None = None) -> list[dict[str, np.ndarray]]:
    """Held-out samples as full compiled batches (count rounded up to a whole number of batches)."""
    b = handle.shapes["batch"]
    n = -(-count // b) * b
    feeds = preprocessor(handle)(raw_samples(handle, part, n, source))
    return [{k: v[i:i + b] for k, v in feeds.items()} for i in range(0, n, b)]


def make_feeds(handle, part: str = "probe", source: str | None = None) -> tuple[torch.Tensor, ...]:
    """One compiled batch as torch tensors, in input order."""
    if handle.adapter.modality == "causal_lm":
        from compressor.program.decoder import prefill_inputs
        from compressor.sources.lm_data import calibration_windows

        ids = calibration_windows(handle.adapter.tokenizer_file, handle.shapes["batch"], handle.shapes["seq_len"], seed=0)
        return prefill_inputs(handle.adapter, ids)
    if handle.adapter.modality == "audio":
        from compressor.sources.speech import speech_features

        return (torch.from_numpy(speech_features(handle.adapter.folder, part, handle.shapes["batch"])),)
    batch = feed_batches(handle, part, handle.shapes["batch"], source)[0]
    return tuple(torch.from_numpy(batch[s.name]) for s in handle.input_specs())
