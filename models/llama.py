"""Llama-family causal language models (SmolLM2 and friends): pre-RMSNorm blocks, rotary positions, GQA."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .base import LayerAdapter, ModelAdapter

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]


class LlamaLayerAdapter(LayerAdapter):
    def __init__(self, layer: nn.Module, heads: int, kv_heads: int):
        super().__init__(layer, heads)
        self.kv_heads = kv_heads
        att, mlp = layer.self_attn, layer.mlp
        self.q, self.k, self.v, self.o = att.q_proj, att.k_proj, att.v_proj, att.o_proj
        self.attn_norm, self.mlp_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.gate, self.up, self.fc_out, self.act = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        self.fc_in = self.up

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
        self.kv_heads = c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self._layers = [LlamaLayerAdapter(l, c.num_attention_heads, self.kv_heads) for l in model.model.layers]

    @property
    def layers(self):
        return self._layers

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
                specs.append(InputSpec(f"past_key_values.{i}.{kind}", (b, self.kv_heads, "past", self.head_dim), "float32"))
        return specs

    def preprocess_config(self, shapes):
        c = self.config
        eos = c.eos_token_id if isinstance(c.eos_token_id, list) else [c.eos_token_id]
        return {"kind": "causal_lm", "tokenizer": "tokenizer.json", "eos_token_ids": [int(e) for e in eos if e is not None],
                "bos_token_id": c.bos_token_id, "num_layers": len(self._layers), "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "vocab_size": c.vocab_size}

    def artifact_files(self):
        return [f for f in TOKENIZER_FILES if (Path(self.folder) / f).exists()]

    @property
    def transformers_loadable(self) -> bool:
        """False once SliceGPT's per_layer mode added shortcut matrices, which stock transformers does not know."""
        return not any("shortcut" in name for name, _ in self.model.named_parameters())

    def describe(self):
        out = super().describe()
        out.update(kv_heads=self.kv_heads, intermediate_size=self.config.intermediate_size,
                   vocab_size=self.config.vocab_size, tied_embeddings=self.lm_head.weight is self.embed_tokens.weight,
                   transformers_loadable=self.transformers_loadable)
        return out

    def reference_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits
