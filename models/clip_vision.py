"""CLIP's vision tower, from `clip_vision_model` folders or the vision half of `clip` folders: pre-LN blocks
with quick-GELU MLPs, a "pre_layrnorm" before the first block, and "post_layernorm" on the CLS token.

`embed_images` returns CLIP's image embedding, `image_embeds` (the visual projection of the post-layernorm CLS
token, not normalised) when the checkpoint has the projection (every `clip` folder; a `clip_vision_model` folder
saved from CLIPVisionModelWithProjection), else the post-layernorm CLS token (CLIPVisionModel's `pooler_output`).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .base import multi_head_attention
from .capabilities import EncoderLayer
from .vision import VisionEncoderAdapter

OPENAI_CLIP = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}


class ClipLayerAdapter(EncoderLayer):
    def __init__(self, layer: nn.Module, head_dim: int):
        super().__init__(layer, head_dim)
        att = layer.self_attn
        self.q, self.k, self.v, self.o = att.q_proj, att.k_proj, att.v_proj, att.out_proj
        self.norm1, self.norm2 = layer.layer_norm1, layer.layer_norm2
        self.fc_in, self.fc_out, self.act = layer.mlp.fc1, layer.mlp.fc2, layer.mlp.activation_fn

    def attention(self, x, bias):
        att = multi_head_attention(self.norm1(x), self.q, self.k, self.v, self.heads, bias)
        return att._replace(x=self.residual(x, "attn") + self.o(att.x))

    def mlp(self, x):
        return self.residual(x, "mlp") + self.layer.mlp(self.norm2(x))  # transformers' CLIPMLP


class ClipVisionAdapter(VisionEncoderAdapter):
    family = "clip"
    model_types = ("clip_vision_model",)
    auto_class = "CLIPVisionModelWithProjection"  # keeps the projection where the checkpoint has one
    default_preprocess = {"size": [224, 224], **OPENAI_CLIP, "resample": "bicubic", "crop": True}
    examples = ("openai/clip-vit-base-patch32", "openai/clip-vit-base-patch16", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K")

    def __init__(self, model, folder):
        super().__init__(model, folder)
        self.vision = model.vision_model
        if not _has_projection(Path(folder)):
            model.visual_projection = None  # not in the checkpoint: transformers initialised it randomly

    @property
    def config(self):
        return self._config

    @config.setter
    def config(self, value):
        """A `clip` folder's config keeps the vision tower's under vision_config: the one passes read and write."""
        self._config = getattr(value, "vision_config", value)

    @property
    def blocks(self):
        return self.model.vision_model.encoder.layers

    def make_layer(self, block):
        return ClipLayerAdapter(block, self.config.hidden_size // self.config.num_attention_heads)

    def special_tokens(self):
        return [self.vision.embeddings.class_embedding]

    def patches(self, pixel_values):
        conv = self.vision.embeddings.patch_embedding
        return conv(pixel_values.to(conv.weight.dtype)).flatten(2).transpose(1, 2)

    def _positions(self, h, w):
        emb = self.vision.embeddings
        n = self.num_tokens({"image_size": [h, w]})
        return emb.interpolate_pos_encoding(emb.position_embedding.weight.new_zeros(1, n, emb.embed_dim), h, w)

    def embed(self, pixel_values):
        x, kinds = super().embed(pixel_values)
        return self.vision.pre_layrnorm(x), kinds

    @property
    def output_size(self) -> int:
        """Width of the pooled output: the projection's where there is one, else the tower's."""
        proj = self.model.visual_projection
        return self.config.hidden_size if proj is None else proj.out_features

    def pool(self, x, size, kinds):
        out = self.vision.post_layernorm(x[:, 0])
        return out if self.model.visual_projection is None else self.model.visual_projection(out)

    def keep_heads(self, index, kept):
        super().keep_heads(index, kept)
        self.non_stock = ("transformers' CLIPAttention reshapes its output to the input width, so a head-pruned CLIP "
                          "runs only in the compiled program")

    def reference_forward(self, pixel_values):
        if self.non_stock:
            raise RuntimeError(self.non_stock)
        out = self.vision(pixel_values=pixel_values, interpolate_pos_encoding=True).pooler_output
        return out if self.model.visual_projection is None else self.model.visual_projection(out)


def _has_projection(folder: Path) -> bool:
    """Whether the checkpoint holds `visual_projection.weight` (read from the safetensors header, or the state dict)."""
    st = folder / "model.safetensors"
    if st.exists():
        from safetensors import safe_open

        with safe_open(str(st), "pt") as f:
            return "visual_projection.weight" in f.keys()
    import torch

    return "visual_projection.weight" in torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)


class ClipAdapter(ClipVisionAdapter):
    """A `clip` folder: transformers' CLIPModel (the text tower stays loaded, unused, so `hf/` is a whole CLIP)."""

    model_types = ("clip",)
    auto_class = "CLIPModel"  # CLIPVisionModelWithProjection would read projection_dim from vision_config, not CLIP's
