"""What every BERT-like text encoder shares: token kinds from the tokenizer's special tokens, pooling as the
sentence-transformers folder configures it, and the tokenizer files the artifact carries.

A family subclass says where its blocks and embeddings live (`blocks`, `make_layer`, `embeddings`) and which
special tokens it uses when the tokenizer files name none.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from pathlib import Path

import torch

from compressor.errors import UsageError

from .base import NORMAL, PAD, PROTECTED, InputSpec
from .capabilities import DepthPrunable, EncoderAdapter, HeadPrunable, WidthPrunable

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "sentencepiece.bpe.model"]


class TextEncoderAdapter(EncoderAdapter, HeadPrunable, WidthPrunable, DepthPrunable):
    """A post-LN text encoder: (input_ids, attention_mask) in, one pooled vector per text out."""

    modality = "text"
    protected_per_sample = 2  # the tokenizer's CLS and SEP (<s> and </s>)
    special_tokens = ("[CLS]", "[SEP]", "[PAD]")  # used when tokenizer_config.json names none

    def __init__(self, model, folder):
        super().__init__(model, folder)
        self._wrap_layers()
        self.pooling, self.normalize = sentence_transformers_pooling(Path(folder))  # "mean" (the class default) or "cls"
        self.cls_id, self.sep_id, self.pad_id = special_ids(Path(folder), self.config, self.special_tokens)

    @abstractmethod
    def embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The family's own embedding module on token ids (positions and token types as the family defines them)."""

    def input_specs(self, shapes):
        b, s = shapes["batch"], shapes["seq_len"]
        return [InputSpec("input_ids", (b, s), "int64"), InputSpec("attention_mask", (b, s), "int64")]

    def num_tokens(self, shapes):
        return shapes["seq_len"]

    def token_kinds(self, input_ids, attention_mask):
        special = (input_ids == self.cls_id) | (input_ids == self.sep_id)
        return torch.where(attention_mask == 0, PAD, torch.where(special, PROTECTED, NORMAL))

    def embed(self, input_ids, attention_mask):
        return self.embeddings(input_ids), self.token_kinds(input_ids, attention_mask)

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

    def reference_hidden(self, input_ids, attention_mask) -> torch.Tensor:
        """transformers' own forward: the last hidden states."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def reference_forward(self, input_ids, attention_mask):
        hidden = self.reference_hidden(input_ids, attention_mask)
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


def sentence_transformers_pooling(folder: Path) -> tuple[str, bool]:
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


def _named_tokens(folder: Path) -> dict[str, str]:
    """cls/sep/pad token strings as tokenizer_config.json (or special_tokens_map.json) names them."""
    names: dict[str, str] = {}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):  # the later file wins
        path = folder / file
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        for key in ("cls_token", "sep_token", "pad_token"):
            value = data.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                names[key] = value
    return names


def special_ids(folder: Path, config, defaults: tuple[str, str, str]) -> tuple[int, int, int]:
    """Ids of the tokens that never merge (CLS, SEP) and of padding, read from the tokenizer files."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.exists():
        raise UsageError(f"{folder} has no tokenizer.json: a text model needs its fast tokenizer file")
    tok = Tokenizer.from_file(str(path))
    named = _named_tokens(folder)
    cls_tok, sep_tok, pad_tok = (named.get(k, d) for k, d in zip(("cls_token", "sep_token", "pad_token"), defaults))
    cls_id, sep_id = tok.token_to_id(cls_tok), tok.token_to_id(sep_tok)
    if cls_id is None or sep_id is None:
        raise UsageError(f"{folder}/tokenizer.json has no '{cls_tok}' or '{sep_tok}' token: name them in tokenizer_config.json")
    pad_id = config.pad_token_id if config.pad_token_id is not None else tok.token_to_id(pad_tok)
    return int(cls_id), int(sep_id), int(pad_id or 0)
