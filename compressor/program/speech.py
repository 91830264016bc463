"""Whisper as three exportable programs: the (merged) encoder, the cross-attention keys/values, and the decoder step.

encoder:  log-mel (B, 80, 3000) -> hidden (B, N', C) and frame sizes (B, N') (how many of the 1500 audio frames each
          token holds; all ones without merging). The token plan runs inside, as for every encoder family.
cross_kv: hidden -> each decoder layer's cross-attention keys and values (B, H, N', hd), computed once per clip.
decoder:  token ids, frame sizes, cross keys/values and the self-attention past -> logits and the present. A merged
          frame stands for `size` frames, so cross-attention adds log(size) to its logits: proportional attention,
          as the encoder itself does (ToMe), and exactly what attending to `size` identical frames would give.
          As in the causal LM program (program/decoder.py), every call takes a past of at least one slot: slot 0 is a
          dummy, always masked, so prefill and decode are one graph with no zero-length dimension; the position of
          the first new token is past length - 1.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from compressor.models.capabilities import SpeechAdapter
from compressor.program.encoder import EncoderProgram, TokenPlan

MASK_BIAS = -1e9
PREFIX_TOKENS = ("<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>")


class SpeechEncoderProgram(nn.Module):
    def __init__(self, adapter: SpeechAdapter, plan: TokenPlan | None = None):
        super().__init__()
        self.inner = EncoderProgram(adapter, plan)
        self.model = adapter.model

    def forward(self, input_features: torch.Tensor):
        enc = self.inner.encode(input_features)
        return enc.hidden, enc.size[..., 0]


class CrossKVProgram(nn.Module):
    def __init__(self, adapter: SpeechAdapter):
        super().__init__()
        self.adapter = adapter
        self.layers = adapter.decoder.layers

    def forward(self, hidden: torch.Tensor):
        heads = self.adapter.config.decoder_attention_heads
        out = []
        for layer in self.layers:
            att = layer.encoder_attn
            out += [split_heads(att.k_proj(hidden), heads), split_heads(att.v_proj(hidden), heads)]
        return tuple(out)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Softmax attention of (B, H, S, hd) queries over (B, H, T, hd) keys with an additive bias; (B, S, H * hd)."""
    b, h, s, hd = q.shape
    logits = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(hd)) + bias
    return (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, s, h * hd)


class WhisperDecoderProgram(nn.Module):
    """One decoder call; inputs (input_ids, frame_sizes, *cross k/v per layer, *past k/v per layer)."""

    def __init__(self, adapter: SpeechAdapter, proportional: bool = True):
        super().__init__()
        self.adapter = adapter
        self.decoder = adapter.decoder
        self.proportional = proportional

    def forward(self, input_ids: torch.Tensor, frame_sizes: torch.Tensor, *kv: torch.Tensor):
        dec, heads = self.decoder, self.adapter.config.decoder_attention_heads
        n = len(dec.layers)
        cross, past = kv[:2 * n], kv[2 * n:]
        s, p = input_ids.shape[1], past[0].shape[2]
        positions = torch.arange(s) + (p - 1)
        x = dec.embed_tokens(input_ids) + dec.embed_positions.weight[positions]
        key_pos = torch.arange(p + s)[None, :]
        query_pos = positions[:, None] + 1  # slot of each new token in the past + new keys
        self_bias = torch.where((key_pos <= query_pos) & (key_pos >= 1), 0.0, MASK_BIAS).to(x.dtype)
        cross_bias = frame_sizes.log()[:, None, None, :] if self.proportional else torch.zeros_like(frame_sizes)[:, None, None, :]
        presents = []
        for i, layer in enumerate(dec.layers):
            att = layer.self_attn
            h = layer.self_attn_layer_norm(x)
            k = torch.cat([past[2 * i], split_heads(att.k_proj(h), heads)], dim=2)
            v = torch.cat([past[2 * i + 1], split_heads(att.v_proj(h), heads)], dim=2)
            presents += [k, v]
            x = x + att.out_proj(attend(split_heads(att.q_proj(h), heads), k, v, self_bias))
            cat = layer.encoder_attn
            h = layer.encoder_attn_layer_norm(x)
            x = x + cat.out_proj(attend(split_heads(cat.q_proj(h), heads), cross[2 * i], cross[2 * i + 1], cross_bias))
            x = x + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(x))))
        logits = dec.layer_norm(x) @ dec.embed_tokens.weight.T
        return (logits, *presents)


def empty_past(adapter: SpeechAdapter, batch: int = 1) -> list[torch.Tensor]:
    """The one-slot dummy past of a first call (always masked)."""
    c = adapter.config
    hd = c.d_model // c.decoder_attention_heads
    return [torch.zeros(batch, c.decoder_attention_heads, 1, hd) for _ in range(2 * c.decoder_layers)]


def suppressed_logits(logits: torch.Tensor, config, first: bool) -> torch.Tensor:
    """Whisper's own generation rules: never the suppressed tokens; at the first step, not blank or end of text."""
    banned = list(config.suppress_tokens or []) + (list(config.begin_suppress_tokens or []) if first else [])
    if banned:
        logits = logits.clone()
        logits[..., banned] = -float("inf")
    return logits


@torch.no_grad()
def greedy_transcribe(adapter: SpeechAdapter, plan: TokenPlan | None, features: torch.Tensor, prefix: list[int],
                      max_new_tokens: int = 96, proportional: bool = True) -> list[int]:
    """Greedy decoding of one clip (B = 1) with our programs: the token ids after the prefix, end of text excluded."""
    hidden, sizes = SpeechEncoderProgram(adapter, plan)(features)
    cross = CrossKVProgram(adapter)(hidden)
    decoder = WhisperDecoderProgram(adapter, proportional)
    eot = adapter.config.eos_token_id
    ids, past, out = torch.tensor([prefix]), empty_past(adapter), []
    for step in range(max_new_tokens):
        logits, *past = decoder(ids, sizes, *cross, *past)
        token = int(suppressed_logits(logits[0, -1], adapter.config, step == 0).argmax())
        if token == eot:
            break
        out.append(token)
        ids = torch.tensor([[token]])
    return out
