"""Budgets for structured pruning: a target fraction of the dense model's parameters or FLOPs to keep, turned into
what must be removed from the model as it stands, with per-block and per-unit costs to spend it on."""

from __future__ import annotations

from dataclasses import dataclass

from compressor.program.capture import capture, graph_stats
from compressor.errors import UsageError


@dataclass(frozen=True)
class Budget:
    kind: str  # "params", "flops" or "latency" (ms, measured: pruning/latency.py)
    keep: float  # fraction of the dense model to keep
    dense: float  # the dense model's total, as loaded
    current: float  # the model's total before this pass
    ms_per_flop: dict | None = None  # latency budgets: the measured price of a FLOP of "heads" and of "channels"
    measurements: dict | None = None  # latency budgets: the timings behind the prices (for the manifest)

    @property
    def to_remove(self) -> float:
        return self.current - self.keep * self.dense

    @property
    def counted(self) -> str:
        """What unit costs are counted in before pricing: latency is priced per FLOP."""
        return "flops" if self.kind == "latency" else self.kind

    def price(self, unit_kind: str, amount: float) -> float:
        """The cost of `amount` (params or FLOPs) of heads or channels in this budget's measure."""
        return amount * self.ms_per_flop[unit_kind] if self.kind == "latency" else amount


def resolve_budget(handle, name: str, params: float | None, flops: float | None) -> Budget:
    """The budget of a pass given `params` or `flops` (fractions of the dense model's totals to keep)."""
    kind, keep = ("params", params) if params is not None else ("flops", flops)
    stats = graph_stats(capture(handle.program(), handle.example_inputs()))
    base = handle.baseline or stats
    budget = Budget(kind, keep, getattr(base, kind), getattr(stats, kind))
    if budget.to_remove <= 0:
        raise UsageError(f"{name}: the model already has {budget.current / budget.dense:.1%} of the dense {kind}, at or "
                         f"under the {kind} = {keep} asked for, so nothing would be removed; ask for less")
    return budget


def tokens_per_layer(handle) -> list[tuple[int, int]]:
    """(tokens into the attention, tokens into the MLP) of every block per sample, after the token plan."""
    if handle.target.decoder:
        n = handle.shapes["seq_len"]
        return [(n, n)] * handle.num_layers
    counts = handle.plan.token_counts(handle.num_tokens, handle.num_layers)
    return list(zip(counts[:-1], counts[1:]))


def head_cost(handle, index: int, query_heads: int, kv_heads: int, kind: str) -> float:
    """Parameters, or FLOPs at the compiled shapes, of `query_heads` query heads and `kv_heads` key/value heads of
    block `index` (attention scores and context included in FLOPs)."""
    layer = handle.adapter.layers[index]
    c, hd = layer.q.in_features, layer.head_dim
    params = (2 * query_heads + 2 * kv_heads) * c * hd
    if kind == "params":
        return params + (query_heads + 2 * kv_heads) * hd * (layer.q.bias is not None)
    n_attn, _ = tokens_per_layer(handle)[index]
    return handle.shapes["batch"] * (2 * n_attn * params + 4 * n_attn * n_attn * query_heads * hd)


def channel_cost(handle, index: int, kind: str) -> float:
    """Parameters, or FLOPs at the compiled shapes, of one MLP channel of block `index`."""
    layer = handle.adapter.layers[index]
    params = layer.fc_out.out_features + sum(r.in_features + (r.bias is not None) for r in layer.channel_readers)
    if kind == "params":
        return params
    _, n_mlp = tokens_per_layer(handle)[index]
    return handle.shapes["batch"] * 2 * n_mlp * (params - sum(r.bias is not None for r in layer.channel_readers))


def block_cost(handle, index: int, kind: str) -> float:
    """Parameters, or FLOPs at the compiled shapes, of block `index`."""
    layer = handle.adapter.layers[index]
    if kind == "params":
        return sum(p.numel() for p in layer.layer.parameters())
    return head_cost(handle, index, layer.heads, layer.kv_heads, "flops") + layer.channels * channel_cost(handle, index, "flops")
