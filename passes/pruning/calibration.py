"""Calibration inputs for any family, and a walk through the blocks that can skip some and collect hidden states.

Text encoders calibrate on paragraphs of the Wikipedia calibration articles (long enough to fill the compiled
length; validation reads the Lee sentences, benchmarks the Lee documents), vision encoders on Fashion-MNIST training
images from index 5000 (validation reads the test set), language models on calibration windows of the same articles
(perplexity is measured on the held-out ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.errors import UsageError

IMAGE_START = 5000  # Fashion-MNIST training images from here on: the probe batch reads the first ones
IMAGE_COUNT = 60000 - IMAGE_START
MIN_PARAGRAPH_WORDS = 40


@dataclass
class Walk:
    """One batch through the model: hidden states after the embedding and after every block that ran, the mask of
    real tokens (B, N), and the model's output (pooled embedding, or logits for language models)."""

    states: list[torch.Tensor]
    mask: torch.Tensor
    output: torch.Tensor


def wiki_paragraphs() -> list[str]:
    from compressor.sources.wiki import wiki_split

    calibration, _ = wiki_split()
    return [p for article in calibration for p in article.split("\n") if len(p.split()) >= MIN_PARAGRAPH_WORDS]


def calibration_batches(handle, samples: int, batch: int, length: int = 256, seed: int = 42) -> list[tuple[torch.Tensor, ...]]:
    """`samples` calibration inputs in batches of `batch`, as the program takes them (encoders at the compiled
    sequence length or image size; language models as `length`-token windows)."""
    ad = handle.adapter
    if ad.modality == "causal_lm":
        from compressor.sources.lm_data import calibration_windows

        windows = calibration_windows(ad.tokenizer_file, samples, length, seed)
        return [(w,) for w in torch.split(windows, batch)]
    from compressor.sources.inputs import preprocessor

    if ad.modality == "text":
        paragraphs = wiki_paragraphs()
        if samples > len(paragraphs):
            raise UsageError(f"calibration_samples must be at most {len(paragraphs)} for text encoders (Wikipedia "
                             f"calibration paragraphs of {MIN_PARAGRAPH_WORDS}+ words), got {samples}")
        g = torch.Generator().manual_seed(seed)
        raw = [paragraphs[int(i)] for i in torch.randperm(len(paragraphs), generator=g)[:samples]]
    else:
        from compressor.sources import data

        if samples > IMAGE_COUNT:
            raise UsageError(f"calibration_samples must be at most {IMAGE_COUNT} for vision encoders, got {samples}")
        images, _ = data.fashion_mnist("train")
        raw = [images[IMAGE_START + i] for i in range(samples)]
    feeds = preprocessor(handle)(raw)
    names = [s.name for s in handle.input_specs()]
    tensors = [torch.from_numpy(feeds[n]) for n in names]
    return [tuple(t[i:i + batch] for t in tensors) for i in range(0, samples, batch)]


def walk(handle, inputs: tuple[torch.Tensor, ...], skip: frozenset[int] | set[int] = frozenset(),
         keep_states: bool = False, start: int = 0, x: torch.Tensor | None = None) -> Walk:
    """Run the model block by block (dense, no token plan), leaving out the blocks in `skip`; with `start` and `x`,
    begin at block `start` from its input `x` (a prefix already computed: SLEB's rounds re-score from there)."""
    ad = handle.adapter
    if ad.modality == "causal_lm":
        from compressor.program.decoder import rotary_and_bias, self_attention

        (ids,) = inputs
        x = ad.embed_tokens(ids) if x is None else x
        mask = torch.ones(ids.shape, dtype=torch.long)
        cos, sin, bias = rotary_and_bias(ad, x, mask, 0)
        states = [x] if keep_states else []
        for i, layer in enumerate(ad.layers):
            if i in skip or i < start:
                continue
            x = layer.residual(x, "attn") + layer.attn_out(self_attention(ad, layer, layer.attn_norm(x), cos, sin, bias)[0])
            x = layer.mlp(x)
            if keep_states:
                states.append(x)
        return Walk(states, mask.bool(), ad.logits(x))
    from compressor.models import PAD
    from compressor.program.encoder import MASK_BIAS

    embedded, kinds = ad.embed(*inputs)
    x = embedded if x is None else x
    bias = torch.where(kinds == PAD, MASK_BIAS, 0.0).to(x.dtype)
    states = [x] if keep_states else []
    for i, layer in enumerate(ad.layers):
        if i in skip or i < start:
            continue
        x = layer.mlp(layer.attention(x, bias)[0])
        if keep_states:
            states.append(x)
    size = torch.ones(x.shape[0], x.shape[1], 1, dtype=x.dtype)
    return Walk(states, kinds != PAD, ad.pool(ad.final_norm(x), size, kinds))


def output_loss(handle, out: torch.Tensor, reference: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """What a removal costs on one batch: for language models the next-token NLL (mean over tokens) of the calibration
    text; for encoders 1 - cosine of the pooled output to the dense model's (mean over samples)."""
    if handle.adapter.modality == "causal_lm":
        logp = torch.log_softmax(out[:, :-1].float(), dim=-1)
        return -logp.gather(-1, ids[:, 1:, None]).mean()
    return 1.0 - torch.nn.functional.cosine_similarity(out.double(), reference.double(), dim=-1).mean()


def real_tokens(handle, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mask (B, N) of the tokens that are not padding, from the program's inputs (text: the attention mask)."""
    if handle.adapter.modality == "text":
        return inputs[1] != 0
    if handle.adapter.modality == "causal_lm":
        return torch.ones(inputs[0].shape, dtype=torch.bool)
    return torch.ones(inputs[0].shape[0], handle.num_tokens, dtype=torch.bool)
