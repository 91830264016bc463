"""DistilBERT encoders: BERT's post-LN math under other names (q_lin/k_lin/v_lin/out_lin, sa_layer_norm,
ffn.lin1/lin2, output_layer_norm), learned absolute positions and no token types."""

from __future__ import annotations

from torch import nn

from .base import multi_head_attention
from .capabilities import EncoderLayer
from .text_encoder import TextEncoderAdapter


class DistilBertLayerAdapter(EncoderLayer):
    def __init__(self, layer: nn.Module, head_dim: int):
        super().__init__(layer, head_dim)
        att = layer.attention
        self.q, self.k, self.v, self.o = att.q_lin, att.k_lin, att.v_lin, att.out_lin
        self.attn_norm, self.mlp_norm = layer.sa_layer_norm, layer.output_layer_norm
        self.fc_in, self.fc_out, self.act = layer.ffn.lin1, layer.ffn.lin2, layer.ffn.activation

    def attention(self, x, bias):
        att = multi_head_attention(x, self.q, self.k, self.v, self.heads, bias)
        return att._replace(x=self.attn_norm(x + self.o(att.x)))

    def mlp(self, x):
        return self.mlp_norm(x + self.layer.ffn(x))  # transformers' FFN module (lin1, activation, lin2)


class DistilBertAdapter(TextEncoderAdapter):
    family = "distilbert"
    model_types = ("distilbert",)
    hf_head_pruning = True
    intermediate_key = "hidden_dim"
    examples = ("sentence-transformers/msmarco-distilbert-base-v4", "distilbert-base-uncased")

    @property
    def blocks(self):
        return self.model.transformer.layer

    def make_layer(self, block):
        return DistilBertLayerAdapter(block, self.config.dim // self.config.n_heads)

    def embeddings(self, input_ids):
        return self.model.embeddings(input_ids)
