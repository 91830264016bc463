"""Qwen2 / Qwen2.5 and Qwen3: Llama blocks with options (transformers' modeling_qwen2.py, modeling_qwen3.py).

Qwen2 always has biases on q/k/v and never on o or the MLP; Qwen3 normalises each head's queries and keys (q_norm,
k_norm) before rotary, sets head_dim explicitly, and has attention biases only with `attention_bias`. Both read a
per-layer sliding window from `layer_types` (off unless `use_sliding_window`).
"""

from __future__ import annotations

from .llama import LlamaAdapter


class Qwen2Adapter(LlamaAdapter):
    family = "qwen2"
    model_types = ("qwen2",)
    stock_biases = {**dict.fromkeys(("q", "k", "v"), True), **dict.fromkeys(("o", "gate", "up", "fc_out"), False)}
    attention_attrs = LlamaAdapter.attention_attrs + ("sliding_window",)


class Qwen3Adapter(LlamaAdapter):
    family = "qwen3"
    model_types = ("qwen3",)
    qk_norm = True
    stock_biases = {**dict.fromkeys(("q", "k", "v", "o"), "attention_bias"), **dict.fromkeys(("gate", "up", "fc_out"), False)}
    attention_attrs = LlamaAdapter.attention_attrs + ("sliding_window",)
