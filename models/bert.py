"""BERT encoders (MiniLM and friends): post-LN blocks, mean pooling as sentence-transformers configures it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from compressor.errors import UsageError

from .base import NORMAL, PAD, PROTECTED, InputSpec, LayerAdapter, ModelAdapter, multi_head_attention

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"]


class BertLayerAdapter(LayerAdapter):
    def __init__(self, layer: nn.Module, head_dim: int):
        super().__init__(layer, head_dim)
        att = layer.attention
        self.q, self.k, self.v = att.self.query, att.self.key, att.self.value
        self.o, self.attn_norm = att.output.dense, att.output.LayerNorm
        self.fc_in, self.act = layer.intermediate.dense, layer.intermediate.intermediate_act_fn
        self.fc_out, self.mlp_norm = layer.output.dense, layer.output.LayerNorm

    def attention(self, x, bias):
        ctx, metric = multi_head_attention(x, self.q, self.k, self.v, self.heads, bias)
        return self.attn_norm(x + self.o(ctx)), metric

    def mlp(self, x):
        return self.mlp_norm(x + self.fc_out(self.act(self.fc_in(x))))


class BertAdapter(ModelAdapter):
    family = "bert"
    modality = "text"
    model_types = ("bert",)
    protected_per_sample = 2  # [CLS] and [SEP]
    hf_head_pruning = True

    def __init__(self, model, folder):
        super().__init__(model, folder)
        self._wrap_layers()
        self.pooling, self.normalize = _sentence_transformers_pooling(Path(folder))
        self.cls_id, self.sep_id, self.pad_id = _special_ids(Path(folder), self.config)

    @property
    def blocks(self):
        return self.model.encoder.layer

    def make_layer(self, block):
        return BertLayerAdapter(block, self.config.hidden_size // self.config.num_attention_heads)

    def input_specs(self, shapes):
        b, s = shapes["batch"], shapes["seq_len"]
        return [InputSpec("input_ids", (b, s), "int64"), InputSpec("attention_mask", (b, s), "int64")]

    def num_tokens(self, shapes):
        return shapes["seq_len"]

    def embed(self, input_ids, attention_mask):
        x = self.model.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))
        special = (input_ids == self.cls_id) | (input_ids == self.sep_id)
        kinds = torch.where(attention_mask == 0, PAD, torch.where(special, PROTECTED, NORMAL))
        return x, kinds

    def final_norm(self, x):
        return x  # post-LN: every block already ends in a norm

    def pool(self, x, size, kinds):
        w = size * (kinds != PAD).unsqueeze(-1).to(x.dtype)
        if self.pooling == "cls":
            out = x[:, 0]
        else:
            out = (x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1e-9)
        if self.normalize:
            out = out / out.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        return out

    def reference_forward(self, input_ids, attention_mask):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        ones = torch.ones(hidden.shape[:2] + (1,), dtype=hidden.dtype)
        kinds = torch.where(attention_mask == 0, PAD, NORMAL)
        return self.pool(hidden, ones, kinds)

    def preprocess_config(self, shapes):
        return {
            "kind": "text",
            "tokenizer": "tokenizer.json",
            "pad_id": self.pad_id,
            "pooling": self.pooling,
            "normalize": self.normalize,
        }

    def artifact_files(self):
        return [f for f in TOKENIZER_FILES if (Path(self.folder) / f).exists()]


def _sentence_transformers_pooling(folder: Path) -> tuple[str, bool]:
    """Mean pooling unless a sentence-transformers config says otherwise; L2-normalise if its pipeline does."""
    pooling, normalize = "mean", False
    cfg = folder / "1_Pooling" / "config.json"
    if cfg.exists():
        c = json.loads(cfg.read_text())
        pooling = "cls" if c.get("pooling_mode_cls_token") else "mean"
    modules = folder / "modules.json"
    if modules.exists():
        normalize = any(m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text()))
    return pooling, normalize


def _special_ids(folder: Path, config) -> tuple[int, int, int]:
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.exists():
        raise UsageError(f"{folder} has no tokenizer.json: a text model needs its fast tokenizer file")
    tok = Tokenizer.from_file(str(path))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    pad_id = config.pad_token_id if config.pad_token_id is not None else tok.token_to_id("[PAD]")
    return int(cls_id), int(sep_id), int(pad_id or 0)
