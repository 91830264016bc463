"""Measured latency for structured pruning: onnxruntime times of the real exported graph, turned into a price per
FLOP of attention heads and of MLP channels (Kwon et al. 2022 prune under a latency lookup table the same way).

Heads and channels cost different amounts per FLOP (attention adds softmax, reshapes and transposes per head; the
MLP is two large matmuls), and neither is free of fixed costs (embeddings, norms, the head). So the model is timed
three times, interleaved: as it stands, with part of every block's heads removed, and with half of every block's
MLP channels removed; the two differences divided by the FLOPs removed give ms per FLOP for each kind of unit. A
unit's latency cost is then its FLOPs cost (pruning/budget.py) times its kind's price.
Latency is that of the compiled shapes: an encoder batch, or a language model's prefill of `seq_len` tokens.
"""

from __future__ import annotations

import copy

import torch

from .budget import channel_cost, head_cost


def head_reduction(layer, gqa: str) -> list[int]:
    """About half of a block's query heads, removable the way the pass would remove them."""
    if layer.kv_heads == layer.heads:
        return list(range(max(1, layer.heads // 2)))
    group = layer.heads // layer.kv_heads
    if gqa == "groups" or group == 1:
        return list(range(max(1, layer.kv_heads // 2) * group))
    return [g * group for g in range(layer.kv_heads)]  # one query head from every group


class LatencyModel:
    """ms per FLOP of heads and of channels, measured on `handle` as it stands (which is left unchanged) with
    `latency.time_handles` (the pass context's `ctx.latency`)."""

    def __init__(self, handle, latency, gqa: str = "per_group", threads: int = 2, repeats: int = 10, dense_handle=None):
        ad = handle.adapter
        if ad.layers[0].heads < 2 or ad.layers[0].channels < 2:
            raise ValueError("too few heads or channels left to measure their latency")
        fewer_heads, fewer_channels = copy.deepcopy(handle), copy.deepcopy(handle)
        head_flops = channel_flops = 0.0
        for i, layer in enumerate(ad.layers):
            gone = head_reduction(layer, gqa)
            kv_gone = len(gone) // (layer.heads // layer.kv_heads) if gqa == "groups" or layer.kv_heads == layer.heads else 0
            head_flops += head_cost(handle, i, len(gone), kv_gone, "flops")
            fewer_heads.adapter.keep_heads(i, [h for h in range(layer.heads) if h not in set(gone)])
            half = layer.channels // 2
            channel_flops += half * channel_cost(handle, i, "flops")
            fewer_channels.adapter.keep_channels(i, list(range(layer.channels - half)))
        for h in (fewer_heads, fewer_channels):
            h.adapter.sync_config()
        handles = {"now": handle, "heads": fewer_heads, "channels": fewer_channels}
        if dense_handle is not None:
            handles["dense"] = dense_handle
        with torch.no_grad():
            self.ms = latency.time_handles(handles, repeats, threads)
        self.now_ms = self.ms["now"]
        self.dense_ms = self.ms.get("dense", self.now_ms)
        # a difference lost in timing noise still prices the unit above zero (ms per FLOP of the whole model)
        floor = 0.05 * self.now_ms / max(head_flops + channel_flops, 1.0)
        self.per_flop = {"heads": max((self.now_ms - self.ms["heads"]) / head_flops, floor),
                         "channels": max((self.now_ms - self.ms["channels"]) / channel_flops, floor)}

    def to_json(self) -> dict:
        return {"measured_ms": {k: round(v, 3) for k, v in self.ms.items()},
                "ms_per_gflop": {k: round(v * 1e9, 4) for k, v in self.per_flop.items()}}
