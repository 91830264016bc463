"""SliceGPT's view of a Llama-family decoder (Llama, Qwen2, Qwen3, Mistral, Phi-3): pre-RMSNorm blocks, token
embeddings, an LM head.

RMSNorm is rotation-invariant once its scale is folded into the linears that read it, so folding is all it takes.
After portable slicing the model is a stock one of width d: a weightless RMS norm over width D acting on d
dimensions equals a standard RMSNorm over d with weight sqrt(D/d) and epsilon scaled by D/d.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .capabilities import SliceableAdapter
from .decoder_attention import rotary_and_bias, self_attention


class LlamaSlicing(SliceableAdapter):
    """The `SliceableAdapter` interface of `LlamaAdapter` and the families that subclass it (any pre-RMSNorm
    `DecoderAdapter` whose layers are `LlamaLayerAdapter`s)."""

    @torch.no_grad()
    def fold_norms(self) -> None:
        """Fold every RMSNorm scale into the linears that read it; norms become weightless. Unties the LM head."""
        for layer in self.layers:
            for norm_name, readers in layer.residual_readers.items():
                norm = getattr(layer, norm_name)
                for lin in readers:
                    lin.weight.mul_(norm.weight[None, :])
                norm.weight.fill_(1.0)
        head, norm = self.lm_head, self.final_norm_module
        head.weight = nn.Parameter(head.weight.detach().clone() * norm.weight[None, :])
        norm.weight.fill_(1.0)
        self.model.config.tie_word_embeddings = False

    @property
    def residual_norms(self) -> list[nn.Module]:
        return [m for layer in self.layers for m in (layer.attn_norm, layer.mlp_norm)] + [self.final_norm_module]

    @property
    def head_readers(self) -> list[nn.Linear]:
        return [self.lm_head]

    def calibration_forward(self, ids: torch.Tensor) -> None:
        self.model.model(input_ids=ids, use_cache=False)

    def embed_stream(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)

    def stream_context(self, x: torch.Tensor):
        """Rotary cos/sin and the causal bias of full windows (no padding)."""
        return rotary_and_bias(self, x, torch.ones(x.shape[:2], dtype=torch.long), 0)

    def block_write(self, layer, block, x, context):
        if block == "mlp":
            return layer.mlp_out(x)
        return layer.attn_out(self_attention(self, layer, layer.attn_norm(x), *context)[0])

    def rotate_embeddings(self, q: torch.Tensor) -> None:
        emb = self.embed_tokens
        emb.weight = nn.Parameter((emb.weight.to(q.dtype) @ q).float(), requires_grad=False)
        emb.embedding_dim = q.shape[1]

    def set_sliced_norm(self, norm: nn.Module, width: int, d: int) -> None:
        eps = self.config.rms_norm_eps
        norm.weight = nn.Parameter(torch.full((d,), math.sqrt(width / d)), requires_grad=False)
        norm.variance_epsilon = eps * width / d

    def record_sliced_width(self, width: int, d: int) -> None:
        """A stock config of width d: head_dim stays (no longer hidden_size / heads), epsilon as the norms have it."""
        c = self.config
        c.head_dim = self.head_dim
        c.hidden_size = d
        c.rms_norm_eps = c.rms_norm_eps * width / d
