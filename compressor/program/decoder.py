"""The exportable decoder forward: prefill and decode in one graph, past key/values in, present key/values out.

Every call takes a past of at least one slot; a prefill passes a single zero slot that its attention mask marks
as absent. That keeps one graph (weights stored once) with dynamic batch, sequence and past lengths, and no
zero-length dimension for the exporter to specialise. Positions come from the attention mask (cumulative sum), so
left padding and the dummy slot never shift them.

The program is written against `DecoderAdapter` and its `DecoderLayer`s (compressor.models.capabilities), not against
one family's modules: any family that implements that interface runs here.
"""

from __future__ import annotations

import torch
from torch import nn

from compressor.models.capabilities import DecoderAdapter
from compressor.models.decoder_attention import MASK_BIAS, rotary_and_bias, self_attention  # noqa: F401  (re-exported)


class DecoderProgram(nn.Module):
    def __init__(self, adapter: DecoderAdapter):
        super().__init__()
        self.adapter = adapter
        self.model = adapter.model  # registered so export sees the parameters

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        ad = self.adapter
        p = past[0].shape[2]
        x = ad.embed_tokens(input_ids)
        cos, sin, bias = rotary_and_bias(ad, x, attention_mask, p)
        presents = []
        for i, layer in enumerate(ad.layers):
            ctx, k, v = self_attention(ad, layer, layer.attn_norm(x), cos, sin, bias, past[2 * i], past[2 * i + 1])
            presents += [k, v]
            x = layer.residual(x, "attn") + layer.attn_out(ctx)
            x = layer.mlp(x)
        return (ad.logits(x), *presents)


def empty_past(adapter: DecoderAdapter, batch: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The one-slot dummy past that a prefill passes (masked out by a leading 0 in the attention mask)."""
    return [torch.zeros(batch, kv, 1, adapter.head_dim, device=device) for kv in adapter.kv_heads for _ in range(2)]


def prefill_inputs(adapter: DecoderAdapter, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Inputs of a prefill on the device of `input_ids`."""
    b, s = input_ids.shape
    mask = torch.ones(b, s + 1, dtype=torch.long, device=input_ids.device)
    mask[:, 0] = 0
    return (input_ids, mask, *empty_past(adapter, b, input_ids.device))
