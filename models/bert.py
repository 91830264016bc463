"""BERT encoders (MiniLM and friends) and RoBERTa/XLM-R, which run the same block: post-LN, mean pooling as
sentence-transformers configures it."""

from __future__ import annotations

import torch
from torch import nn

from .base import multi_head_attention
from .capabilities import EncoderLayer
from .text_encoder import TextEncoderAdapter


class BertLayerAdapter(EncoderLayer):
    def __init__(self, layer: nn.Module, head_dim: int):
        super().__init__(layer, head_dim)
        att = layer.attention
        self.q, self.k, self.v = att.self.query, att.self.key, att.self.value
        self.o, self.attn_norm = att.output.dense, att.output.LayerNorm
        self.fc_in, self.act = layer.intermediate.dense, layer.intermediate.intermediate_act_fn
        self.fc_out, self.mlp_norm = layer.output.dense, layer.output.LayerNorm

    def attention(self, x, bias):
        att = multi_head_attention(x, self.q, self.k, self.v, self.heads, bias)
        return att._replace(x=self.attn_norm(x + self.o(att.x)))

    def mlp(self, x):
        return self.mlp_norm(x + self.fc_out(self.act(self.fc_in(x))))


class BertAdapter(TextEncoderAdapter):
    family = "bert"
    model_types = ("bert",)
    hf_head_pruning = True
    examples = ("example:minilm", "sentence-transformers/all-MiniLM-L6-v2", "BAAI/bge-small-en-v1.5")

    @property
    def blocks(self):
        return self.model.encoder.layer

    def make_layer(self, block):
        return BertLayerAdapter(block, self.config.hidden_size // self.config.num_attention_heads)

    def embeddings(self, input_ids):
        return self.model.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))


class RobertaAdapter(BertAdapter):
    """BERT's block; the embedding numbers positions from padding_idx + 1 (skipping padding) and has one token type."""

    family = "roberta"
    model_types = ("roberta", "xlm-roberta")
    special_tokens = ("<s>", "</s>", "<pad>")
    examples = ("sentence-transformers/all-distilroberta-v1", "paraphrase-multilingual-mpnet-base-v2 (XLM-R)", "roberta-base")
