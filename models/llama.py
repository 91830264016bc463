"""Llama-family causal language models (SmolLM2 and friends): pre-RMSNorm blocks, rotary positions, GQA."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .base import LayerAdapter, ModelAdapter, head_rows, keep_columns, keep_rows

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]


class LlamaLayerAdapter(LayerAdapter):
    def __init__(self, layer: nn.Module, head_dim: int):
        super().__init__(layer, head_dim)
        att, mlp = layer.self_attn, layer.mlp
        self.q, self.k, self.v, self.o = att.q_proj, att.k_proj, att.v_proj, att.o_proj
        self.attn_norm, self.mlp_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.gate, self.up, self.fc_out, self.act = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        self.fc_in = self.up

    @property
    def channel_readers(self):
        return [self.gate, self.up]

    def keep_heads(self, kept):
        """Keep these query heads and the key/value groups they read; every kept group must keep the same number of
        query heads (grouped-query attention repeats each key/value head over a fixed group)."""
        group = self.heads // self.kv_heads
        groups = sorted({h // group for h in kept})
        per_group = {g: sum(1 for h in kept if h // group == g) for g in groups}
        if len(set(per_group.values())) != 1:
            raise ValueError(f"kept query heads {kept} leave unequal groups {per_group}: grouped-query attention needs "
                             "the same number of query heads in every key/value group")
        q_rows, kv_rows = head_rows(kept, self.head_dim), head_rows(groups, self.head_dim)
        keep_rows(self.q, q_rows)
        keep_rows(self.k, kv_rows)
        keep_rows(self.v, kv_rows)
        keep_columns(self.o, q_rows)
        self.layer.self_attn.num_key_value_groups = self.heads // self.kv_heads  # transformers' own forward agrees

    @property
    def residual_readers(self) -> dict[str, list[nn.Linear]]:
        """Linears that read the residual stream, grouped by the norm in front of them."""
        return {"attn_norm": [self.q, self.k, self.v], "mlp_norm": [self.gate, self.up]}

    @property
    def residual_writers(self) -> list[nn.Linear]:
        return [self.o, self.fc_out]

    def mlp_out(self, x):
        h = self.mlp_norm(x)
        return self.fc_out(self.act(self.gate(h)) * self.up(h))

    def mlp(self, x):
        return self.residual(x, "mlp") + self.mlp_out(x)


class LlamaAdapter(ModelAdapter):
    family = "llama"
    modality = "causal_lm"
    model_types = ("llama",)
    auto_class = "AutoModelForCausalLM"
    norm_placement = "pre"

    def __init__(self, model, folder):
        super().__init__(model, folder)
        c = self.config
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self._wrap_layers()

    @property
    def blocks(self):
        return self.model.model.layers

    def make_layer(self, block):
        return LlamaLayerAdapter(block, self.head_dim)

    @property
    def kv_heads(self) -> list[int]:
        """Key/value heads of every block (they differ after width pruning removed whole groups unevenly)."""
        return [l.kv_heads for l in self._layers]

    def _renumber_layers(self, old_index):
        super()._renumber_layers(old_index)
        for i, block in enumerate(self.blocks):
            block.self_attn.layer_idx = i  # transformers' KV cache is keyed by it
        if isinstance(getattr(self.config, "layer_types", None), list):
            self.config.layer_types = [self.config.layer_types[i] for i in old_index]

    def sync_config(self):
        super().sync_config()
        layers, c = self._layers, self.config
        if len({l.heads for l in layers}) == 1 and len({l.kv_heads for l in layers}) == 1:
            c.num_attention_heads, c.num_key_value_heads = layers[0].heads, layers[0].kv_heads
            c.head_dim = self.head_dim  # no longer hidden_size / heads
        # a compensated output projection has a bias; transformers' Llama has biases on all of a module's
        # projections or on none (attention_bias, mlp_bias), so the others get zero biases
        for flag, group in (("attention_bias", lambda l: [l.q, l.k, l.v, l.o]), ("mlp_bias", lambda l: [l.gate, l.up, l.fc_out])):
            if any(lin.bias is not None for l in layers for lin in group(l)):
                setattr(c, flag, True)
                for lin in (lin for l in layers for lin in group(l) if lin.bias is None):
                    lin.bias = nn.Parameter(torch.zeros(lin.out_features), requires_grad=False)

    @property
    def tokenizer_file(self) -> Path:
        return Path(self.folder) / "tokenizer.json"

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.model.embed_tokens

    @property
    def final_norm_module(self) -> nn.Module:
        return self.model.model.norm

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    @property
    def rotary(self) -> nn.Module:
        return self.model.model.rotary_emb

    def num_tokens(self, shapes):
        return shapes["seq_len"]

    def input_specs(self, shapes):
        from .base import InputSpec

        b = "batch"  # one graph for every batch, prompt and cache length
        specs = [InputSpec("input_ids", (b, "sequence"), "int64"), InputSpec("attention_mask", (b, "total"), "int64")]
        for i in range(len(self._layers)):
            for kind in ("key", "value"):
                specs.append(InputSpec(f"past_key_values.{i}.{kind}", (b, self.kv_heads[i], "past", self.head_dim), "float32"))
        return specs

    def preprocess_config(self, shapes):
        c = self.config
        eos = c.eos_token_id if isinstance(c.eos_token_id, list) else [c.eos_token_id]
        return {"kind": "causal_lm", "tokenizer": "tokenizer.json", "eos_token_ids": [int(e) for e in eos if e is not None],
                "bos_token_id": c.bos_token_id, "num_layers": len(self._layers), "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "vocab_size": c.vocab_size}

    def artifact_files(self):
        return [f for f in TOKENIZER_FILES if (Path(self.folder) / f).exists()]

    def describe(self):
        out = super().describe()
        kv = self.kv_heads
        out.update(kv_heads=kv[0] if len(set(kv)) == 1 else kv,
                   vocab_size=self.config.vocab_size, tied_embeddings=self.lm_head.weight is self.embed_tokens.weight)
        return out

    def reference_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits
