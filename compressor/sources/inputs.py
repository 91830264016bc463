"""Real inputs at the compiled shapes: probe batches for pass checks, held-out batches for validation, and the
calibration inputs every calibrating pass draws (`calibration_inputs`: the recipe's data or the built-in sets).

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
    """The runtime's own pre-processing for this handle's inputs (its target says which)."""
    return handle.target.preprocessor(handle)


def text_preprocessor(handle) -> TextPreprocessor:
    pre = handle.adapter.preprocess_config(handle.shapes)
    return TextPreprocessor(Path(handle.adapter.folder) / pre["tokenizer"], handle.shapes["seq_len"], pre["pad_id"])


def image_preprocessor(handle) -> ImagePreprocessor:
    return ImagePreprocessor.from_config(handle.adapter.preprocess_config(handle.shapes))


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
    """`count` texts or images: from the user's file/folder if given (repeated to fill `count` when it holds fewer),
    else the bundled real data sets (validation texts fill the compiled length; probe texts are Lee background
    sentences; images are natural photographs: probe crops from the calibration photos, held-out validation photos
    from other packages)."""
    return handle.target.raw_samples(handle, part, count, source)


def text_samples(handle, part: str, count: int, source: str | None = None) -> list[str]:
    if source:
        texts = data.read_text_file(source)
    elif part == "validation":
        texts = validation_texts(count, handle.shapes["seq_len"])
    else:
        texts = data.text_split(part, count)
    return (texts * (count // len(texts) + 1))[:count]


def image_samples(handle, part: str, count: int, source: str | None = None) -> list:
    if source:
        images = data.read_image_folder(source, count)
        return (images * (count // len(images) + 1))[:count]
    return data.image_split(part, count, handle.shapes.get("image_size"))


MIN_PARAGRAPH_WORDS = 40
MAX_BUILTIN_IMAGES = 4096  # crops of the built-in calibration photos: past this, give a folder of your own


def wiki_paragraphs() -> list[str]:
    """Paragraphs of 40+ words of the Wikipedia calibration articles (the held-out ones are validation's)."""
    from compressor.sources.wiki import wiki_split

    calibration, _ = wiki_split()
    return [p for article in calibration for p in article.split("\n") if len(p.split()) >= MIN_PARAGRAPH_WORDS]


def calibration_inputs(handle, samples: int, length: int = 256, seed: int = 42, option: str = "calibration_samples",
                       length_option: str = "calibration_len") -> tuple[torch.Tensor, ...]:
    """The calibration inputs of every pass that calibrates, as the program takes them (all `samples` rows): the
    recipe's `[data] calibration` when the handle carries one (`data.attach_calibration`), else the built-in sets.

    Text encoders: `samples` lines or paragraphs of the user's file, or Wikipedia calibration paragraphs, at the
    compiled sequence length. Vision encoders: `samples` images of the user's folder, or random crops of the built-in
    calibration photographs (`photos.py`). Language models: `samples` windows of `length` tokens at seeded random
    offsets in the user's text or the Wikipedia calibration articles. Drawn with `seed`; `option` and `length_option`
    name the pass options that asked, in the one-line refusal when the data holds too little."""
    return handle.target.calibration_inputs(handle, samples, length, seed, option, length_option)


def lm_calibration(handle, samples: int, length: int, seed: int, option: str, length_option: str) -> tuple[torch.Tensor]:
    """Language models: `samples` windows of `length` tokens at seeded random offsets in the user's text or the
    Wikipedia calibration articles."""
    from compressor.sources.lm_data import calibration_windows

    user = getattr(handle, "calibration", None)
    return (calibration_windows(handle.adapter.tokenizer_file, samples, length, seed, user, option, length_option),)


def text_calibration(handle, samples: int, seed: int, option: str) -> list[str]:
    """Text encoders: `samples` lines or paragraphs of the user's file, or Wikipedia calibration paragraphs."""
    user = getattr(handle, "calibration", None)
    if user is not None:
        return user.texts(samples, seed, option)
    paragraphs = wiki_paragraphs()
    if samples > len(paragraphs):
        raise UsageError(f"{option} must be at most {len(paragraphs)} for text encoders (Wikipedia calibration "
                         f"paragraphs of {MIN_PARAGRAPH_WORDS}+ words), got {samples}; or give your own: "
                         f"[data] calibration = \"FILE\"")
    g = torch.Generator().manual_seed(seed)
    return [paragraphs[int(i)] for i in torch.randperm(len(paragraphs), generator=g)[:samples]]


def image_calibration(handle, samples: int, seed: int, option: str) -> list:
    """Vision encoders: `samples` images of the user's folder, or random crops of the built-in calibration photos."""
    user = getattr(handle, "calibration", None)
    if user is not None:
        return user.images(samples, seed, option)
    from compressor.sources.photos import calibration_crops

    if samples > MAX_BUILTIN_IMAGES:
        raise UsageError(f"{option} must be at most {MAX_BUILTIN_IMAGES} with the built-in calibration photographs "
                         f"(crops of 13 photos), got {samples}; or give your own: [data] calibration = \"FOLDER\"")
    return calibration_crops(samples, seed, size=handle.shapes["image_size"])


def as_inputs(handle, raw: list) -> tuple[torch.Tensor, ...]:
    """Raw texts or images pre-processed as the runtime does, as the program's input tensors."""
    return as_tensors(handle, preprocessor(handle)(raw))


def as_tensors(handle, feeds: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    """Named feeds as the program's input tensors, in input order."""
    return tuple(torch.from_numpy(feeds[s.name]) for s in handle.input_specs())


def calibration_description(handle) -> str:
    """What `calibration_inputs` reads for this handle, for pass records and manifests."""
    user = getattr(handle, "calibration", None)
    return user.describe() if user is not None else handle.target.calibration_description


def feed_batches(handle, part: str, count: int, source: str | None = None) -> list[dict[str, np.ndarray]]:
    """Held-out samples as full compiled batches (count rounded up to a whole number of batches)."""
    b = handle.shapes["batch"]
    n = -(-count // b) * b
    feeds = preprocessor(handle)(raw_samples(handle, part, n, source))
    return [{k: v[i:i + b] for k, v in feeds.items()} for i in range(0, n, b)]


def make_feeds(handle, part: str = "probe", source: str | None = None) -> tuple[torch.Tensor, ...]:
    """One compiled batch as torch tensors, in input order."""
    return handle.target.probe_feeds(handle, part, source)


def encoder_feeds(handle, part: str = "probe", source: str | None = None) -> tuple[torch.Tensor, ...]:
    return as_tensors(handle, feed_batches(handle, part, handle.shapes["batch"], source)[0])
