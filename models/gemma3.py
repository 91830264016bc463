"""Gemma 3 text (`gemma3_text`, transformers' modeling_gemma3.py): Llama blocks with Gemma's changes.

The embedding is scaled by sqrt(hidden) (transformers' `Gemma3TextScaledWordEmbedding` does it in its forward);
RMSNorms scale by (1 + w) (the norm modules are called as they are); per-head q/k norms; four norms per block: the
attention and MLP outputs are normalised again before the residual add (`post_attention_layernorm`,
`post_feedforward_layernorm`); sliding-window layers rotate with their own base (`rotary_emb_local`); scores are
scaled by query_pre_attn_scalar^-1/2; final logits are tanh soft-capped where `final_logit_softcapping` is set.
`attn_logit_softcapping` is not applied: Gemma 3 replaced it by the q/k norms and transformers 4.57's Gemma 3
attention ignores it, so the program does too (it must match stock transformers, which reloads the result).

SliceGPT is refused (`slicing_refusal`; the adapter is a `LlamaLikeAdapter`, not a `SliceableAdapter`): a block's
output reaches the residual stream through an RMSNorm whose per-channel scale does not commute with a rotation.
"""

from __future__ import annotations

from compressor.errors import UsageError

from .llama import LlamaLayerAdapter, LlamaLikeAdapter, require


class Gemma3LayerAdapter(LlamaLayerAdapter):
    def __init__(self, layer, head_dim, config):
        super().__init__(layer, head_dim, qk_norm=True, sliding_window=layer.self_attn.sliding_window)
        self.mlp_norm = layer.pre_feedforward_layernorm
        self.post_attn_norm, self.post_mlp_norm = layer.post_attention_layernorm, layer.post_feedforward_layernorm
        self.rope = "local" if layer.self_attn.is_sliding else "global"
        self.query_scale = config.query_pre_attn_scalar ** -0.5

    @property
    def attn_scale(self) -> float:
        return self.query_scale

    def attn_out(self, ctx):
        return self.post_attn_norm(self.o(ctx))

    def mlp_out(self, x):
        return self.post_mlp_norm(super().mlp_out(x))


class Gemma3Adapter(LlamaLikeAdapter):
    family = "gemma3"
    model_types = ("gemma3_text",)
    examples = ("example:gemma3-270m", "google/gemma-3-270m")  # listed by `compress models`
    norm_placement = "sandwich"  # pre- and post-norms around attention and MLP
    qk_norm = True
    stock_biases = {**dict.fromkeys(("q", "k", "v", "o"), "attention_bias"), **dict.fromkeys(("gate", "up", "fc_out"), False)}
    attention_attrs = LlamaLikeAdapter.attention_attrs + ("sliding_window", "is_sliding")
    slicing_refusal = ("slicegpt cannot rotate gemma3's residual stream: each block's output passes an RMSNorm before "
                       "the residual add, and the norm's per-channel scale does not commute with a rotation "
                       "(computational invariance breaks); use width_prune, layer_prune or distill")

    def __init__(self, model, folder):
        if getattr(model.config, "use_bidirectional_attention", False):
            raise UsageError("gemma3: use_bidirectional_attention (an embedding model) is not a causal language model; "
                             "the decoder program attends causally")
        require(model.model, ["rotary_emb_local"], self.family)
        super().__init__(model, folder)

    def check_block(self, block):
        super().check_block(block)
        require(block, ["pre_feedforward_layernorm", "post_feedforward_layernorm"], self.family)

    def make_layer(self, block):
        self.check_block(block)
        return Gemma3LayerAdapter(block, self.head_dim, self.config)

    @property
    def rotaries(self) -> dict:
        return {"global": self.model.model.rotary_emb, "local": self.model.model.rotary_emb_local}

    @property
    def embed_scale(self):
        """sqrt(hidden), which transformers' Gemma3TextScaledWordEmbedding applies in its forward."""
        return self.embed_tokens.embed_scale

    @property
    def logit_softcap(self):
        return self.config.final_logit_softcapping
