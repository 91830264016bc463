"""DINOv2 vision transformers: pre-LN blocks with layer scale; the CLS token after the final norm is the embedding."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .base import NORMAL, PROTECTED, InputSpec, multi_head_attention
from .capabilities import DepthPrunable, EncoderAdapter, EncoderLayer, HeadPrunable, SliceableLayer, WidthPrunable
from .dinov2_slicing import Dinov2Slicing

DEFAULT_PREPROCESS = {"size": [224, 224], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "resample": "bicubic"}


class Dinov2LayerAdapter(EncoderLayer, SliceableLayer):
    def __init__(self, layer: nn.Module, head_dim: int):
        super().__init__(layer, head_dim)
        att = layer.attention
        self.q, self.k, self.v, self.o = att.attention.query, att.attention.key, att.attention.value, att.output.dense
        self.norm1, self.norm2 = layer.norm1, layer.norm2
        self.scale1, self.scale2 = layer.layer_scale1, layer.layer_scale2
        if not hasattr(layer.mlp, "fc1"):
            from compressor.errors import UsageError

            raise UsageError("DINOv2 with a SwiGLU MLP is not supported yet (only the fc1/fc2 MLP of ViT-S/B/L)")
        self.fc_in, self.fc_out, self.act = layer.mlp.fc1, layer.mlp.fc2, layer.mlp.activation

    def attention_out(self, x, bias):
        """The attention block's write to the residual stream (as `x`), with the metric and probabilities."""
        att = multi_head_attention(self.norm1(x), self.q, self.k, self.v, self.heads, bias)
        return att._replace(x=self.scale1(self.o(att.x)))

    def attention(self, x, bias):
        att = self.attention_out(x, bias)
        return att._replace(x=self.residual(x, "attn") + att.x)

    def mlp_out(self, x):
        return self.scale2(self.fc_out(self.act(self.fc_in(self.norm2(x)))))

    def mlp(self, x):
        return self.residual(x, "mlp") + self.mlp_out(x)

    @property
    def residual_readers(self):
        return {"norm1": [self.q, self.k, self.v], "norm2": [self.fc_in]}

    @property
    def residual_writers(self):
        return [self.o, self.fc_out]

    def writer_sliced(self, writer):
        """Layer scale multiplies the write (folded: ones), so it takes the writer's width."""
        scale = self.scale1 if writer is self.o else self.scale2
        scale.lambda1 = nn.Parameter(torch.ones(writer.out_features), requires_grad=False)


class Dinov2Adapter(Dinov2Slicing, EncoderAdapter, HeadPrunable, WidthPrunable, DepthPrunable):
    family = "dinov2"
    title = "DINOv2"
    modality = "image"
    model_types = ("dinov2",)
    protected_per_sample = 1  # CLS
    pooling = "cls"  # pool() reads the class token
    norm_placement = "pre"
    hf_head_pruning = True
    intermediate_key = "mlp_ratio"

    def __init__(self, model, folder):
        super().__init__(model, folder)
        self._wrap_layers()
        cfg = Path(folder) / "preprocessor_config.json"
        self.preprocess = dict(DEFAULT_PREPROCESS)
        if cfg.exists():
            self.preprocess.update({k: v for k, v in json.loads(cfg.read_text()).items() if k in DEFAULT_PREPROCESS})
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def blocks(self):
        return self.model.encoder.layer

    def make_layer(self, block):
        return Dinov2LayerAdapter(block, self.config.hidden_size // self.config.num_attention_heads)

    def _renumber_layers(self, old_index):
        """DINOv2's config is also a backbone config: its stage names and output stage follow the depth."""
        super()._renumber_layers(old_index)
        c = self.config
        c.stage_names = ["stem"] + [f"stage{i}" for i in range(1, len(old_index) + 1)]
        c.out_features = [c.stage_names[-1]]

    def input_specs(self, shapes):
        h, w = shapes["image_size"]
        return [InputSpec("pixel_values", (shapes["batch"], 3, h, w), "float32")]

    def num_tokens(self, shapes):
        h, w = shapes["image_size"]
        p = self.config.patch_size
        return (h // p) * (w // p) + 1

    def prepare(self, shapes):
        self.position_embeddings(*shapes["image_size"])

    def position_embeddings(self, h: int, w: int) -> torch.Tensor:
        """Interpolated once per image size at compile time, so the graph carries a constant instead of a resize."""
        if (h, w) not in self._pos_cache:
            emb = self.model.embeddings
            n = (h // self.config.patch_size) * (w // self.config.patch_size) + 1
            with torch.no_grad():
                dummy = torch.zeros(1, n, emb.position_embeddings.shape[-1])  # the stream may be sliced
                self._pos_cache[(h, w)] = emb.interpolate_pos_encoding(dummy, h, w).detach().clone()
        return self._pos_cache[(h, w)]

    def refresh_positions(self) -> None:
        """Recompute the cached position embeddings after a pass rewrote them."""
        sizes = list(self._pos_cache)
        self._pos_cache.clear()
        for h, w in sizes:
            self.position_embeddings(h, w)

    def embed(self, pixel_values):
        emb = self.model.embeddings
        b, _, h, w = pixel_values.shape
        patches = emb.patch_embeddings(pixel_values)
        x = torch.cat([emb.cls_token.expand(b, -1, -1), patches], dim=1) + self.position_embeddings(h, w)
        position = torch.arange(x.shape[1])
        kinds = torch.where(position == 0, PROTECTED, NORMAL).expand(b, -1)
        return x, kinds

    def final_norm(self, x):
        return x  # the final norm is per token: pool() applies it to the CLS token alone

    def pool(self, x, size, kinds):
        return self.model.layernorm(x[:, 0])

    def reference_forward(self, pixel_values):
        if self.has_shortcuts:
            raise RuntimeError("transformers' DINOv2 forward has no shortcut matrices: after SliceGPT's per_layer mode "
                               "only the compiled program computes this model")
        return self.model(pixel_values=pixel_values).pooler_output

    def preprocess_config(self, shapes):
        return {"kind": "image", **self.preprocess, "size": list(shapes["image_size"])}
