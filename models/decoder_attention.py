"""The decoder block's attention math, written against `DecoderAdapter` (rotary tables, causal and sliding-window
bias, grouped-query attention with a past): shared by the decoder program and the families' SliceGPT hooks, so it
lives beside the adapters and the program imports it (never the other way round)."""

from __future__ import annotations

import torch

from .capabilities import DecoderAdapter, DecoderLayer

MASK_BIAS = -1e9


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotary_and_bias(ad: DecoderAdapter, x: torch.Tensor, attention_mask: torch.Tensor, past_len: int):
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


def self_attention(ad: DecoderAdapter, layer: DecoderLayer, h: torch.Tensor, cos, sin, bias, past_k=None, past_v=None):
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
