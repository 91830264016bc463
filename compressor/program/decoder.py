"""The exportable decoder forward: prefill and decode in one graph, past key/values in, present key/values out.

Every call takes a past of at least one slot; a prefill passes a single zero slot that its attention mask marks
as absent. That keeps one graph (weights stored once) with dynamic batch, sequence and past lengths, and no
zero-length dimension for the exporter to specialise. Positions come from the attention mask (cumulative sum), so
left padding and the dummy slot never shift them.
"""

from __future__ import annotations

import torch
from torch import nn

from compressor.models import LlamaAdapter

MASK_BIAS = -1e9


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotary_and_bias(ad: LlamaAdapter, x: torch.Tensor, attention_mask: torch.Tensor, past_len: int):
    """Rotary cos/sin for the new tokens and the additive causal + padding bias over past and new keys.

    With sliding-window layers (Mistral, Qwen) a key more than `window` slots behind the query is masked too, as in
    transformers; the bias is then one tensor if every layer has the same window, else a dict keyed by window (None:
    full attention) from which `self_attention` takes its layer's. Likewise cos/sin are dicts keyed by `layer.rope`
    where layers use different rotary tables (Gemma 3's local and global bases).
    """
    s = x.shape[1]
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, past_len:]
    ropes = sorted({layer.rope for layer in ad.layers} or {None}, key=str)
    tables = {key: [t[:, None] for t in ad.rotaries[key](x, positions)] for key in ropes}
    cos, sin = {key: t[0] for key, t in tables.items()}, {key: t[1] for key, t in tables.items()}
    key_pos = torch.arange(past_len + s, device=x.device)[None, :]
    query_pos = (torch.arange(s, device=x.device) + past_len)[:, None]
    allowed = (key_pos <= query_pos)[None, None] & (attention_mask[:, None, None, :] == 1)
    biases = {}
    for w in sorted({layer.sliding_window for layer in ad.layers} or {None}, key=lambda w: w or 0):
        inside = allowed if w is None else allowed & (key_pos > query_pos - w)[None, None]
        biases[w] = torch.where(inside, 0.0, MASK_BIAS).to(x.dtype)
    bias = next(iter(biases.values())) if len(biases) == 1 else biases
    if len(tables) == 1:
        cos, sin = next(iter(cos.values())), next(iter(sin.values()))
    return cos, sin, bias


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of each head (all of them unless the family rotates part: Phi-3's
    partial_rotary_factor); the rest pass through."""
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :rd], x[..., rd:]
    return torch.cat([rot * cos + rotate_half(rot) * sin, rest], dim=-1)


def self_attention(ad: LlamaAdapter, layer, h: torch.Tensor, cos, sin, bias, past_k=None, past_v=None):
    """Grouped-query attention with rotary positions (per-head q/k RMSNorm first where the family has it); returns
    the context (before the output projection, `layer.attn_out`) and the full keys/values."""
    b, s, _ = h.shape
    q = layer.q(h).view(b, s, layer.heads, ad.head_dim)
    k = layer.k(h).view(b, s, layer.kv_heads, ad.head_dim)
    if layer.q_norm is not None:
        q, k = layer.q_norm(q), layer.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = layer.v(h).view(b, s, layer.kv_heads, ad.head_dim).transpose(1, 2)
    if isinstance(bias, dict):
        bias = bias[layer.sliding_window]
    if isinstance(cos, dict):
        cos, sin = cos[layer.rope], sin[layer.rope]
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if past_k is not None:
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
    groups = layer.heads // layer.kv_heads
    kr = k.repeat_interleave(groups, dim=1)
    vr = v.repeat_interleave(groups, dim=1)
    logits = (q @ kr.transpose(-1, -2)) * layer.attn_scale + bias
    ctx = (logits.softmax(-1) @ vr).transpose(1, 2).reshape(b, s, layer.heads * ad.head_dim)
    return ctx, k, v


class DecoderProgram(nn.Module):
    def __init__(self, adapter: LlamaAdapter):
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


def empty_past(adapter: LlamaAdapter, batch: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The one-slot dummy past that a prefill passes (masked out by a leading 0 in the attention mask)."""
    return [torch.zeros(batch, kv, 1, adapter.head_dim, device=device) for kv in adapter.kv_heads for _ in range(2)]


def prefill_inputs(adapter: LlamaAdapter, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Inputs of a prefill on the device of `input_ids`."""
    b, s = input_ids.shape
    mask = torch.ones(b, s + 1, dtype=torch.long, device=input_ids.device)
    mask[:, 0] = 0
    return (input_ids, mask, *empty_past(adapter, b, input_ids.device))
