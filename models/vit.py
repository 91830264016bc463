"""ViT and DeiT encoders: pre-LN blocks (layernorm_before/after); the embedding is the CLS token after the final
layernorm (`last_hidden_state[:, 0]`). The checkpoints' tanh pooler is left out: classification checkpoints ship
it untrained. DeiT's distillation token never merges, like CLS."""

from __future__ import annotations

from torch import nn

from .base import multi_head_attention
from .capabilities import EncoderLayer
from .vision import VisionEncoderAdapter


class ViTLayerAdapter(EncoderLayer):
    def __init__(self, layer: nn.Module, head_dim: int):
        super().__init__(layer, head_dim)
        att = layer.attention
        self.q, self.k, self.v, self.o = att.attention.query, att.attention.key, att.attention.value, att.output.dense
        self.norm1, self.norm2 = layer.layernorm_before, layer.layernorm_after
        self.fc_in, self.act, self.fc_out = layer.intermediate.dense, layer.intermediate.intermediate_act_fn, layer.output.dense

    def attention(self, x, bias):
        att = multi_head_attention(self.norm1(x), self.q, self.k, self.v, self.heads, bias)
        return att._replace(x=self.residual(x, "attn") + self.o(att.x))

    def mlp(self, x):
        # transformers' ViTIntermediate, and ViTOutput, which adds the residual itself
        return self.layer.output(self.layer.intermediate(self.norm2(x)), self.residual(x, "mlp"))


class ViTAdapter(VisionEncoderAdapter):
    family = "vit"
    model_types = ("vit",)
    hf_head_pruning = True
    default_preprocess = {"size": [224, 224], "mean": [0.5] * 3, "std": [0.5] * 3, "resample": "bilinear"}
    examples = ("google/vit-base-patch16-224", "facebook/deit-tiny-patch16-224 (a vit checkpoint)")

    @property
    def blocks(self):
        return self.model.encoder.layer

    def make_layer(self, block):
        return ViTLayerAdapter(block, self.config.hidden_size // self.config.num_attention_heads)

    def special_tokens(self):
        return [self.model.embeddings.cls_token]

    def patches(self, pixel_values):
        return self.model.embeddings.patch_embeddings(pixel_values, interpolate_pos_encoding=True)

    def _positions(self, h, w):
        emb = self.model.embeddings
        n = self.num_tokens({"image_size": [h, w]})
        return emb.interpolate_pos_encoding(emb.position_embeddings.new_zeros(1, n, emb.position_embeddings.shape[-1]), h, w)

    def pool(self, x, size, kinds):
        return self.model.layernorm(x[:, 0])

    def reference_forward(self, pixel_values):
        return self.model(pixel_values=pixel_values, interpolate_pos_encoding=True).last_hidden_state[:, 0]


class DeiTAdapter(ViTAdapter):
    family = "deit"
    model_types = ("deit",)
    protected_per_sample = 2  # CLS and the distillation token
    default_preprocess = {"size": [224, 224], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "resample": "bicubic"}
    examples = ("facebook/deit-small-distilled-patch16-224", "facebook/deit-base-distilled-patch16-224")

    def special_tokens(self):
        emb = self.model.embeddings
        return [emb.cls_token, emb.distillation_token]

    def patches(self, pixel_values):
        return self.model.embeddings.patch_embeddings(pixel_values)
