"""Phi-3 (`phi3`, transformers' modeling_phi3.py): Llama math with fused projections.

Attention reads the residual stream through one `qkv_proj` and the MLP through one `gate_up_proj`. The adapter
replaces each by a `FusedLinear` holding the parts as separate Linears, so every pass prunes, rotates and slices q,
k, v, gate and up as in Llama; transformers' own forward still gets the concatenated output, and the state dict
holds the fused `weight` again, so `save_pretrained` writes a folder stock transformers loads. Phi-3 has no biases,
rotates `partial_rotary_factor` of each head (Phi-4-mini: 0.75) and may slide a window on every layer; its
`longrope` checkpoints (128k context) are refused, as their rotary tables change with the sequence length.
"""

from __future__ import annotations

import torch
from torch import nn

from .llama import PROJECTIONS, LlamaAdapter, LlamaLayerAdapter


class FusedLinear(nn.Module):
    """One fused projection held as its parts (stacked along the output); serialised fused."""

    def __init__(self, fused: nn.Linear, sizes: list[int]):
        super().__init__()
        self.parts = nn.ModuleList()
        biases = fused.bias.split(sizes) if fused.bias is not None else [None] * len(sizes)
        for w, b in zip(fused.weight.split(sizes), biases):
            part = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype, device=w.device)
            part.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
            if b is not None:
                part.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
            self.parts.append(part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """The fused `weight` (and `bias`) transformers expects, from the parts' current values."""
        destination = {} if destination is None else destination
        weight = torch.cat([p.weight for p in self.parts])
        destination[prefix + "weight"] = weight if keep_vars else weight.detach()
        if any(p.bias is not None for p in self.parts):
            bias = torch.cat([p.bias if p.bias is not None else torch.zeros(p.out_features) for p in self.parts])
            destination[prefix + "bias"] = bias if keep_vars else bias.detach()
        return destination

    def _load_from_state_dict(self, state_dict, prefix, *args):
        """A fused entry is split into the parts' entries at their current sizes."""
        sizes = [p.out_features for p in self.parts]
        for name in ("weight", "bias"):
            fused = state_dict.pop(prefix + name, None)
            if fused is not None:
                for i, piece in enumerate(fused.split(sizes)):
                    state_dict[f"{prefix}parts.{i}.{name}"] = piece


class Phi3LayerAdapter(LlamaLayerAdapter):
    def attention_inputs(self, att):
        return tuple(att.qkv_proj.parts)

    def gated_mlp(self, mlp):
        gate, up = mlp.gate_up_proj.parts
        return gate, up, mlp.activation_fn


class Phi3Adapter(LlamaAdapter):
    family = "phi3"
    model_types = ("phi3",)
    stock_biases = dict.fromkeys(PROJECTIONS, False)
    attention_attrs = ("qkv_proj", "o_proj")
    mlp_attrs = ("gate_up_proj", "down_proj", "activation_fn")

    def layer_window(self, block):
        return self.config.sliding_window

    def make_layer(self, block):
        self.check_block(block)
        att, mlp, c = block.self_attn, block.mlp, self.config
        if not isinstance(att.qkv_proj, FusedLinear):  # blocks are wrapped again after layers are removed
            kv = c.num_key_value_heads * self.head_dim
            att.qkv_proj = FusedLinear(att.qkv_proj, [c.num_attention_heads * self.head_dim, kv, kv])
            mlp.gate_up_proj = FusedLinear(mlp.gate_up_proj, [c.intermediate_size] * 2)
        return Phi3LayerAdapter(block, self.head_dim, self.qk_norm, self.layer_window(block))
