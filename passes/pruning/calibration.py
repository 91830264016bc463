"""Calibration inputs for any family, and a walk through the blocks that can skip some and collect hidden states.

Every calibrating pass draws its inputs from the pass context (`ctx.calibration.inputs`, compressor/pipeline/context.py):
the recipe's `[data] calibration` (a text file, or a folder of images) when it gives one, else the built-in sets, each held apart
from what validation reads. Text encoders: paragraphs of the Wikipedia calibration articles (long enough to fill the
compiled length; validation reads held-out articles, benchmarks the Lee documents). Vision encoders: random crops of
natural photographs from Debian's lomiri-wallpapers-16.04 (validation reads other photographs, from the scikit-image,
scikit-learn and matplotlib packages). Language models: token windows of the same calibration articles (perplexity is
measured on the held-out ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Walk", "calibration_batches", "output_loss", "real_tokens", "walk"]


@dataclass
class Walk:
    """One batch through the model: hidden states after the embedding and after every block that ran, the mask of
    real tokens (B, N), and the model's output (pooled embedding, or logits for language models)."""

    states: list[torch.Tensor]
    mask: torch.Tensor
    output: torch.Tensor


def calibration_batches(calibration, samples: int, batch: int, length: int = 256, seed: int = 42,
                        option: str = "calibration_samples") -> list[tuple[torch.Tensor, ...]]:
    """`samples` calibration inputs in batches of `batch`, as the program takes them (encoders at the compiled
    sequence length or image size; language models as `length`-token windows): `calibration.inputs` (the pass
    context's `ctx.calibration`), batched."""
    tensors = calibration.inputs(samples, length, seed, option)
    return [tuple(t[i:i + batch] for t in tensors) for i in range(0, samples, batch)]


def walk(handle, inputs: tuple[torch.Tensor, ...], skip: frozenset[int] | set[int] = frozenset(),
         keep_states: bool = False, start: int = 0, x: torch.Tensor | None = None) -> Walk:
    """Run the model block by block (dense, no token plan), leaving out the blocks in `skip`; with `start` and `x`,
    begin at block `start` from its input `x` (a prefix already computed: SLEB's rounds re-score from there)."""
    ad = handle.adapter
    if handle.target.decoder:
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
    if handle.target.decoder:
        logp = torch.log_softmax(out[:, :-1].float(), dim=-1)
        return -logp.gather(-1, ids[:, 1:, None]).mean()
    return 1.0 - torch.nn.functional.cosine_similarity(out.double(), reference.double(), dim=-1).mean()


def real_tokens(handle, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mask (B, N) of the tokens that are not padding, from the program's inputs (text: the attention mask)."""
    if handle.target.text:
        return inputs[1] != 0
    if handle.target.decoder:
        return torch.ones(inputs[0].shape, dtype=torch.bool)
    return torch.ones(inputs[0].shape[0], handle.num_tokens, dtype=torch.bool)
