"""Llama-family causal language models (SmolLM2 and friends): pre-RMSNorm blocks, rotary positions, GQA.

Families that differ from Llama only in options (biases, per-head q/k norms, a sliding window) subclass
`LlamaAdapter` and set class attributes (see qwen.py, mistral.py); the block math stays in one place
(`compressor.program.decoder`, typed against `DecoderAdapter`, which does not assume this layout). Module attribute
names are those of transformers 4.57 and are checked on load.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from compressor.errors import UsageError

from .base import head_rows, keep_columns, keep_rows
from .capabilities import DecoderAdapter, DecoderLayer, DepthPrunable, HeadPrunable, SliceableLayer, WidthPrunable
from .llama_slicing import LlamaSlicing

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "fc_out")
# rotary types whose frequencies change with the sequence length at run time: a static graph cannot follow them
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def require(module: nn.Module, names, family: str) -> None:
    """One clear line when transformers lays a module out differently from the version the adapter was written for."""
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        import transformers

        raise UsageError(f"transformers {transformers.__version__}: {type(module).__name__} has no '{missing[0]}'; the "
                         f"{family} adapter is written against transformers 4.57 (pip install 'transformers>=4.57,<4.58')")


class LlamaLayerAdapter(DecoderLayer, SliceableLayer):
    rope = None  # which of the adapter's `rotaries` this block's attention uses (Gemma 3: "local" or "global")

    def __init__(self, layer: nn.Module, head_dim: int, qk_norm: bool = False, sliding_window: int | None = None):
        super().__init__(layer, head_dim)
        att, mlp = layer.self_attn, layer.mlp
        (self.q, self.k, self.v), self.o = self.attention_inputs(att), att.o_proj
        self.attn_norm, self.mlp_norm = layer.input_layernorm, layer.post_attention_layernorm
        (self.gate, self.up, self.act), self.fc_out = self.gated_mlp(mlp), mlp.down_proj
        self.fc_in = self.up
        # Qwen3: RMSNorm over each head's query and key before rotary (one weight shared by the heads: pruning
        # heads leaves it as it is); None elsewhere
        self.q_norm, self.k_norm = (att.q_norm, att.k_norm) if qk_norm else (None, None)
        self.sliding_window = sliding_window  # keys further back than this many slots are masked (Mistral, Qwen)

    def attention_inputs(self, att: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        """The query, key and value projections (Phi-3 keeps them fused and overrides this)."""
        return att.q_proj, att.k_proj, att.v_proj

    def gated_mlp(self, mlp: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Module]:
        """The MLP's gate and up projections and the activation on the gate."""
        return mlp.gate_proj, mlp.up_proj, mlp.act_fn

    @property
    def attn_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def attn_out(self, ctx):
        """The attention context written back to the residual stream (Gemma normalises it first)."""
        return self.o(ctx)

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


class LlamaLikeAdapter(DecoderAdapter, HeadPrunable, WidthPrunable, DepthPrunable):
    """The `DecoderAdapter` of transformers' Llama module layout (model.model.embed_tokens/layers/norm/rotary_emb,
    lm_head; self_attn.q/k/v/o_proj; mlp.gate/up/down_proj): Llama and the families that follow it with options
    (qwen.py, mistral.py, phi3.py) or with their own changes (gemma3.py). Not sliceable by itself: `LlamaAdapter`
    adds SliceGPT's interface, which Gemma 3's post-block norms rule out."""

    norm_placement = "pre"
    qk_norm = False  # per-head RMSNorm on queries and keys before rotary (Qwen3)
    # which projections stock transformers gives a bias: a config flag (all of them or none), True (always), False
    # (never); a bias where transformers has none (a compensated o_proj, say) makes the model non-reloadable
    stock_biases = {**dict.fromkeys(("q", "k", "v", "o"), "attention_bias"), **dict.fromkeys(("gate", "up", "fc_out"), "mlp_bias")}
    attention_attrs = ("q_proj", "k_proj", "v_proj", "o_proj")  # what the adapter reads from transformers' attention
    mlp_attrs = ("gate_proj", "up_proj", "down_proj", "act_fn")  # and from its MLP

    def __init__(self, model, folder):
        super().__init__(model, folder)
        c = self.config
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        require(model, ["model", "lm_head"], self.family)
        require(model.model, ["embed_tokens", "layers", "norm", "rotary_emb"], self.family)
        rope = getattr(model.model.rotary_emb, "rope_type", "default")
        if rope in LENGTH_DEPENDENT_ROPE:
            raise UsageError(f"{self.family}: rope scaling '{rope}' changes with the sequence length at run time, which "
                             "one exported graph cannot follow; use a checkpoint with static rope scaling")
        self._wrap_layers()

    @property
    def blocks(self):
        return self.model.model.layers

    def layer_window(self, block: nn.Module) -> int | None:
        """The block's sliding attention window, None for full attention (transformers' attribute, where it has one)."""
        return getattr(block.self_attn, "sliding_window", None)

    def check_block(self, block: nn.Module) -> None:
        require(block, ["self_attn", "mlp", "input_layernorm", "post_attention_layernorm"], self.family)
        require(block.self_attn, self.attention_attrs + (("q_norm", "k_norm") if self.qk_norm else ()), self.family)
        require(block.mlp, self.mlp_attrs, self.family)

    def make_layer(self, block):
        self.check_block(block)
        return LlamaLayerAdapter(block, self.head_dim, self.qk_norm, self.layer_window(block))

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
        # a compensated output projection has a bias; where a config flag gives biases to all of a module's
        # projections or to none (Llama's attention_bias, mlp_bias) the others get zero biases, and where
        # transformers always has one (Qwen2's q/k/v) a projection without gets a zero bias
        for rule in set(self.stock_biases.values()) - {False}:
            lins = [getattr(l, n) for l in layers for n in PROJECTIONS if self.stock_biases[n] == rule]
            if rule is True or any(lin.bias is not None for lin in lins):
                if rule is not True:
                    setattr(c, rule, True)
                for lin in (lin for lin in lins if lin.bias is None):
                    lin.bias = nn.Parameter(torch.zeros(lin.out_features), requires_grad=False)

    @property
    def transformers_loadable(self):
        """Also false where a projection has a bias that the family's transformers module cannot hold."""
        never = [n for n in PROJECTIONS if self.stock_biases[n] is False]
        return super().transformers_loadable and not any(getattr(l, n).bias is not None for l in self._layers for n in never)

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

    @property
    def rotaries(self) -> dict:
        """Rotary modules keyed by `LlamaLayerAdapter.rope`: one shared by every block here."""
        return {None: self.rotary}


class LlamaAdapter(LlamaSlicing, LlamaLikeAdapter):
    """Llama: the Llama layout, and SliceGPT's interface (its pre-RMSNorms fold into their readers)."""

    family = "llama"
    model_types = ("llama",)
