"""Mistral: Llama math with no biases and a sliding attention window on every layer (transformers'
modeling_mistral.py reads `config.sliding_window` in each attention; None means full attention)."""

from __future__ import annotations

from .llama import PROJECTIONS, LlamaAdapter


class MistralAdapter(LlamaAdapter):
    family = "mistral"
    model_types = ("mistral",)
    stock_biases = dict.fromkeys(PROJECTIONS, False)

    def layer_window(self, block):
        return self.config.sliding_window
