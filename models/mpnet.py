"""MPNet encoders (all-mpnet-base-v2 and friends): BERT's post-LN block, RoBERTa-style positions, plus a relative
position bias that the encoder computes once from one shared table and adds to every layer's attention logits.

Token merging changes which positions a token stands for, and the program carries only hidden states through a
merge. So between a block's attention and its MLP the hidden states carry one more channel, the token's position,
which the merge averages by token size like any feature; the MLP strips it again, so no block, norm or pooling ever
sees it. Before the first merge the bias is transformers' own, computed once per forward in `embed`; after it, the
bias is transformers' bucketed bias at the merged tokens' (rounded) mean positions.
"""

from __future__ import annotations

import torch
from torch import nn

from compressor.errors import UsageError

from .base import biased_attention
from .capabilities import EncoderLayer
from .text_encoder import TextEncoderAdapter

# transformers' MPNetEncoder.forward calls compute_position_bias with its default bucket count, not the config's
NUM_BUCKETS = 32


class MPNetLayerAdapter(EncoderLayer):
    def __init__(self, layer: nn.Module, head_dim: int, owner: "MPNetAdapter"):
        super().__init__(layer, head_dim)
        att = layer.attention
        self.q, self.k, self.v, self.o = att.attn.q, att.attn.k, att.attn.v, att.attn.o
        self.attn_norm = att.LayerNorm
        self.fc_in, self.act = layer.intermediate.dense, layer.intermediate.intermediate_act_fn
        self.fc_out, self.mlp_norm = layer.output.dense, layer.output.LayerNorm
        self.owner = owner

    @property
    def bias_heads(self) -> list[int]:
        """The original heads this block still has (transformers' prune_heads records the others)."""
        gone = self.layer.attention.pruned_heads
        kept = [h for h in range(self.owner.config.num_attention_heads) if h not in gone]
        if len(kept) != self.heads:
            raise RuntimeError("MPNet heads must be pruned through the model adapter's keep_heads, which records them "
                               "so each block reads its own rows of the shared position bias")
        return kept

    def attention(self, x, bias):
        pos = self.owner.position_bias(x.shape[1])
        heads = self.bias_heads
        if len(heads) != pos.shape[1]:
            pos = pos[:, heads]
        att = biased_attention(x, self.q, self.k, self.v, self.heads, bias[:, None, None, :] + pos)
        out = self.attn_norm(x + self.o(att.x))
        return att._replace(x=torch.cat([out, self.owner.positions[..., None].to(out.dtype)], dim=-1))

    def mlp(self, x):
        self.owner.positions = x[..., -1]
        x = x[..., :-1]
        return self.layer.output(self.layer.intermediate(x), x)  # transformers' MPNetIntermediate/MPNetOutput


class MPNetAdapter(TextEncoderAdapter):
    family = "mpnet"
    model_types = ("mpnet",)
    special_tokens = ("<s>", "</s>", "<pad>")
    hf_head_pruning = True
    examples = ("sentence-transformers/all-mpnet-base-v2", "sentence-transformers/multi-qa-mpnet-base-dot-v1")

    def __init__(self, model, folder):
        enc = type(model.encoder)
        if not (hasattr(enc, "compute_position_bias") and hasattr(enc, "relative_position_bucket")):
            raise UsageError("this transformers version's MPNetEncoder has no compute_position_bias/relative_position_bucket; "
                             "install the pinned transformers (see constraints.txt)")
        super().__init__(model, folder)
        self.positions: torch.Tensor | None = None  # (B, N) position each token stands for, set by embed
        self._dense_bias: torch.Tensor | None = None

    @property
    def blocks(self):
        return self.model.encoder.layer

    def make_layer(self, block):
        return MPNetLayerAdapter(block, self.config.hidden_size // self.config.num_attention_heads, self)

    def embeddings(self, input_ids):
        return self.model.embeddings(input_ids=input_ids)

    def embed(self, input_ids, attention_mask):
        x, kinds = super().embed(input_ids, attention_mask)
        b, n = input_ids.shape
        self.positions = torch.arange(n, dtype=x.dtype).expand(b, n)
        self._dense_bias = self.model.encoder.compute_position_bias(x[:1], num_buckets=NUM_BUCKETS)  # (1, H, N, N)
        return x, kinds

    def position_bias(self, n: int) -> torch.Tensor:
        """(B or 1, H, n, n): transformers' bias while no token merged, else the bias at the tokens' mean positions."""
        if n == self._dense_bias.shape[-1]:
            return self._dense_bias
        pos = self.positions.round().long()
        bucket = self.model.encoder.relative_position_bucket(pos[:, None, :] - pos[:, :, None], num_buckets=NUM_BUCKETS)
        return self.model.encoder.relative_attention_bias(bucket).permute(0, 3, 1, 2)

    def keep_heads(self, index, kept):
        super().keep_heads(index, kept)
        self.non_stock = ("transformers' MPNet adds one position bias with every head to all layers, so a head-pruned "
                          "MPNet runs only in the compiled program")

    def reference_hidden(self, input_ids, attention_mask):
        if any(b.attention.pruned_heads for b in self.blocks):
            raise RuntimeError(self.non_stock)
        return super().reference_hidden(input_ids, attention_mask)
