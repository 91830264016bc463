"""width_prune: remove attention heads and MLP channels under one global budget, retraining-free (Kwon et al. 2022,
"A Fast Post-Training Pruning Framework for Transformers"; FLAP).

Importance per head and channel (`fisher`, `activation` or `magnitude`: see pruning/importance.py) is ranked across
all blocks at once: units go in order of importance per unit of cost (parameters, FLOPs, or milliseconds measured
with onnxruntime: pruning/latency.py) until the budget is met, so how much each block loses is an outcome, not an
input. Channels go in groups of `round_to` (kernel-friendly widths); every block keeps at least one head (one per key/value group) and one group of channels. What was removed
is compensated on the output projection that read it (pruning/compensate.py).

Grouped-query attention (Llama): `gqa = "per_group"` removes the same number of query heads from every key/value
group (the k/v projections stay); `gqa = "groups"` removes whole key/value groups with their query heads.
`uniform = true` removes the same heads-per-block and channels-per-block everywhere, so the result is a standard
transformers model (saved in the artifact's hf/ folder); otherwise the manifest says it is not reloadable (BERT and
DINOv2 record pruned heads in their config, so only their MLP widths need be uniform).
"""

from __future__ import annotations

import copy
import heapq
import time
from dataclasses import dataclass, field

import torch

from compressor.errors import UsageError
from compressor.models import HeadPrunable, WidthPrunable
from compressor.models.base import head_rows
from compressor.pipeline.pass_base import Pass, PassResult, register

from .pruning.budget import Budget, channel_cost, head_cost, resolve_budget
from .pruning.calibration import calibration_batches
from .pruning.compensate import compensated, set_projection
from .pruning.importance import calibrate, channel_scores, head_scores
from .pruning.latency import LatencyModel

IMPORTANCE = ("fisher", "activation", "magnitude")
COMPENSATE = ("least_squares", "bias", "none")


@dataclass
class WidthPruneConfig:
    params: float | None = field(default=None, metadata={"help": "fraction of the dense model's parameters to keep, e.g. 0.85"})
    flops: float | None = field(default=None, metadata={"help": "fraction of the dense model's FLOPs (compiled shapes) to keep"})
    latency: float | None = field(default=None, metadata={"help": "fraction of the dense model's onnxruntime latency (compiled shapes; language models: a prefill of seq_len tokens) to keep, measured on this machine"})
    threads: int = field(default=2, metadata={"help": "onnxruntime threads when measuring a latency budget (as the deployment will run)"})
    importance: str = field(default="activation", metadata={"help": "activation (FLAP fluctuation, relative to the residual stream), fisher (mask gradients of a label-free distillation loss) or magnitude (weights only)"})
    compensate: str = field(default="least_squares", metadata={"help": "least_squares (refit the output projection), bias (FLAP: removed units' mean into the bias) or none"})
    heads: bool = field(default=True, metadata={"help": "attention heads may be removed"})
    mlp: bool = field(default=True, metadata={"help": "MLP channels may be removed"})
    gqa: str = field(default="per_group", metadata={"help": "grouped-query attention: per_group (the same query heads from every key/value group) or groups (whole key/value groups)"})
    uniform: bool = field(default=False, metadata={"help": "the same sizes in every block (a stock transformers model)"})
    round_to: int = field(default=8, metadata={"help": "MLP channels are removed in groups of this many per block"})
    calibration_samples: int = field(default=64, metadata={"help": "calibration inputs (language models: windows of calibration_len tokens)"})
    calibration_len: int = field(default=256, metadata={"help": "tokens per calibration window (language models)"})
    seed: int = field(default=42, metadata={"help": "seed for the calibration data and the Fisher sampling"})
    batch: int = field(default=8, metadata={"help": "calibration inputs per forward pass (Fisher runs one at a time)"})
    damping: float = field(default=0.01, metadata={"help": "ridge damping of the least-squares refit, relative to the mean diagonal"})

    def __post_init__(self):
        given = [n for n in ("params", "flops", "latency") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one budget: params, flops or latency (got {', '.join(given) or 'none'})")
        v = getattr(self, given[0])
        if not 0.0 < v < 1.0:
            raise ValueError(f"{given[0]} is the fraction of the dense model to keep and must lie in (0, 1), got {v}")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"importance must be one of {', '.join(IMPORTANCE)}, got {self.importance!r}")
        if self.compensate not in COMPENSATE:
            raise ValueError(f"compensate must be one of {', '.join(COMPENSATE)}, got {self.compensate!r}")
        if self.gqa not in ("per_group", "groups"):
            raise ValueError(f"gqa must be 'per_group' or 'groups', got {self.gqa!r}")
        if not (self.heads or self.mlp):
            raise ValueError("heads and mlp are both off: nothing may be removed")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.round_to < 1 or self.calibration_samples < 1 or self.batch < 1 or self.calibration_len < 8 or self.damping <= 0:
            raise ValueError("round_to, calibration_samples and batch must be >= 1, calibration_len >= 8, damping > 0")


@dataclass
class Unit:
    """Something that can be removed: heads or channels (indices per block) with their summed importance and cost."""

    kind: str  # "heads" or "channels"
    members: dict[int, list[int]]  # block -> indices into its current heads or channels
    score: float
    cost: float


@register
class WidthPrune(Pass):
    name = "width_prune"
    summary = "remove attention heads and MLP channels under a global parameter or FLOPs budget (Fisher / FLAP importance, least-squares compensation)"
    Config = WidthPruneConfig
    ensures = frozenset({"width_pruned"})
    runs_before = {"slicegpt[mode=per_layer]": "per_layer slicing fits its rotations and shortcut matrices to the "
                                               "blocks as they stand"}

    def calibration_need(self, target):
        return "calibration_samples", self.config.calibration_samples

    def check(self, handle) -> None:
        super().check(handle)
        if not isinstance(handle.adapter, (HeadPrunable, WidthPrunable)):
            raise UsageError(f"width_prune does not apply to a {handle.adapter.family} model (its adapter cannot remove "
                             f"attention heads or MLP channels)")
        if handle.adapter.has_shortcuts:
            raise UsageError("width_prune must come before slicegpt's per_layer mode (run it first, then slice)")

    def run(self, handle, ctx) -> PassResult:
        cfg: WidthPruneConfig = self.config
        start = time.perf_counter()
        dense = None
        if cfg.latency is None:
            budget = resolve_budget(handle, self.name, cfg.params, cfg.flops)
        else:
            budget, dense = self._latency_budget(handle, ctx)
        self._check_reachable(handle, budget)
        batches = calibration_batches(ctx.calibration, cfg.calibration_samples, cfg.batch, cfg.calibration_len, cfg.seed)
        cal = calibrate(handle, batches, fisher=cfg.importance == "fisher", gram=cfg.compensate == "least_squares", seed=cfg.seed)
        scoring = time.perf_counter() - start
        heads = head_scores(handle, cal, cfg.importance) if cfg.heads else None
        channels = channel_scores(handle, cal, cfg.importance) if cfg.mlp else None
        queues = self._queues(handle, heads, channels, budget)
        pristine = copy.deepcopy(handle.adapter) if budget.kind == "latency" else None
        need, attempts = budget.to_remove, []
        most = sum(u.cost for q in queues for u in q)
        while True:
            removed = select(queues, min(need, most))
            if not removed:
                raise UsageError("width_prune: the budget removes nothing; ask for less")
            plan = self._apply(handle, removed, cal)
            handle.adapter.sync_config()
            if pristine is None:
                break
            attempts.append(self._check_latency(handle, ctx, dense, budget, sum(u.cost for u in removed)))
            need = self._corrected(budget, need, attempts, ctx.latency.tolerance, ctx.latency.attempts)
            if need is None:
                break
            handle.adapter = copy.deepcopy(pristine)  # the prices were off: start again from the unpruned model
        ad = handle.adapter
        budget_info = {"kind": budget.kind, "keep": budget.keep}
        if attempts:
            budget_info["latency"] = {**budget.measurements, **attempts[-1], "attempts": attempts}
        return PassResult(modified=True, info={
            "importance": cfg.importance, "compensate": cfg.compensate,
            "budget": budget_info,
            "heads_per_layer": [l.heads for l in ad.layers], "kv_heads_per_layer": [l.kv_heads for l in ad.layers],
            "channels_per_layer": [l.channels for l in ad.layers],
            "kept_heads": plan["heads"], "kept_channels_count": [len(k) for k in plan["channels"]],
            "calibration_samples": cfg.calibration_samples, "calibration": ctx.calibration.description(),
            "scoring_seconds": round(scoring, 2), "seconds": round(time.perf_counter() - start, 2),
            "transformers_loadable": ad.transformers_loadable,
        })

    def _latency_budget(self, handle, ctx) -> tuple[Budget, object]:
        """Measure the model as it stands (and as loaded, if earlier passes changed it) and price heads and channels;
        returns the budget and the dense model as loaded (`ctx.reference()`), which every attempt is timed against."""
        dense = ctx.reference()
        changed = any(r.get("modified", True) for r in handle.history)
        model = LatencyModel(handle, ctx.latency, self.config.gqa, self.config.threads,
                             dense_handle=dense if changed else None)
        budget = Budget("latency", self.config.latency, model.dense_ms, model.now_ms, model.per_flop, model.to_json())
        if budget.to_remove <= 0:
            raise UsageError(f"width_prune: the model already runs in {budget.current / budget.dense:.1%} of the dense "
                             f"latency, at or under latency = {budget.keep}; ask for less")
        return budget, dense

    def _check_latency(self, handle, ctx, dense, budget, predicted_saving: float) -> dict:
        """Time the result against the dense model: the price table is a prediction, this is the measurement."""
        ms = ctx.latency.time_handles({"dense": dense, "pruned": handle}, threads=self.config.threads)
        return {"predicted_ratio": round((budget.current - predicted_saving) / budget.dense, 4),
                "measured_ratio": round(ms["pruned"] / ms["dense"], 4), "check_ms": {k: round(v, 3) for k, v in ms.items()}}

    @staticmethod
    def _corrected(budget, need: float, attempts: list[dict], tolerance: float, most: int) -> float | None:
        """What to remove next time, or None when the last measurement is within `tolerance` of the budget (or the
        `most` attempts are spent): the amount asked for, scaled by the saving wanted over the saving measured (removing
        heads and channels together does not save exactly the sum of their prices, nor the same on every machine)."""
        got = attempts[-1]["measured_ratio"]
        if abs(got / budget.keep - 1) <= tolerance or len(attempts) >= most:
            return None
        start = budget.current / budget.dense
        saved = start - got
        return need * (start - budget.keep) / saved if saved > 0 else None

    def _check_reachable(self, handle, budget) -> None:
        """Before calibrating (minutes for Fisher on a language model): can removing all that may go meet it?"""
        zeros = lambda sizes: [torch.zeros(n) for n in sizes]  # noqa: E731  (costs do not depend on scores)
        layers = handle.adapter.layers
        heads = zeros(l.heads for l in layers) if self.config.heads else None
        channels = zeros(l.channels for l in layers) if self.config.mlp else None
        most = sum(u.cost for q in self._queues(handle, heads, channels, budget) for u in q)
        if most < budget.to_remove:
            raise UsageError(f"width_prune: removing every head and channel that may go leaves more than {budget.kind} = "
                             f"{budget.keep}; ask for less, allow both heads and mlp, or combine with layer_prune")

    def _queues(self, handle, heads, channels, budget: Budget) -> list[list[Unit]]:
        """Ordered lists of units: each list must be taken from its front (least important first)."""
        cfg, ad = self.config, handle.adapter
        per_block: list[list[list[Unit]]] = []  # block -> its lists
        for i, layer in enumerate(ad.layers):
            lists = []
            if heads is not None:
                lists.append(self._head_units(handle, i, heads[i], budget))
            if channels is not None:
                order = torch.argsort(channels[i]).tolist()
                chunks = [order[j:j + cfg.round_to] for j in range(0, len(order), cfg.round_to)]
                cost = budget.price("channels", channel_cost(handle, i, budget.counted))
                lists.append([Unit("channels", {i: c}, float(channels[i][c].sum()), cost * len(c))
                              for c in chunks[:-1]])  # the most important group of channels always stays
            per_block.append(lists)
        if not cfg.uniform:
            return [lst for lists in per_block for lst in lists]
        merged = []  # the k-th unit of every block, together
        for k in range(len(per_block[0])):
            lists = [lists[k] for lists in per_block]
            depth = min(len(lst) for lst in lists)
            merged.append([Unit(lists[0][0].kind if lists[0] else "", {b: u for lst in lists for b, u in lst[j].members.items()},
                                sum(lst[j].score for lst in lists), sum(lst[j].cost for lst in lists)) for j in range(depth)])
        return merged

    def _head_units(self, handle, i: int, scores: torch.Tensor, budget: Budget) -> list[Unit]:
        layer = handle.adapter.layers[i]
        kind = budget.counted
        group = layer.heads // layer.kv_heads
        if layer.kv_heads == layer.heads:  # multi-head attention: any head but the last one standing
            order = torch.argsort(scores).tolist()[:-1]
            cost = budget.price("heads", head_cost(handle, i, 1, 1, kind))
            return [Unit("heads", {i: [h]}, float(scores[h]), cost) for h in order]
        by_group = scores.view(layer.kv_heads, group)
        if self.config.gqa == "groups":
            order = torch.argsort(by_group.sum(1)).tolist()[:-1]
            cost = budget.price("heads", head_cost(handle, i, group, 1, kind))
            return [Unit("heads", {i: list(range(g * group, (g + 1) * group))}, float(by_group[g].sum()), cost) for g in order]
        ranked = torch.argsort(by_group, dim=1)  # per group, its heads from least to most important
        cost = budget.price("heads", head_cost(handle, i, layer.kv_heads, 0, kind))
        return [Unit("heads", {i: [g * group + int(ranked[g, r]) for g in range(layer.kv_heads)]},
                     float(by_group.gather(1, ranked[:, r:r + 1]).sum()), cost) for r in range(group - 1)]

    def _apply(self, handle, removed: list[Unit], cal) -> dict:
        """Compensate each block's output projections for what goes, then remove it."""
        cfg, ad = self.config, handle.adapter
        plan = {"heads": [], "channels": []}
        for i in range(len(ad.layers)):
            layer = ad.layers[i]
            gone_heads = {h for u in removed if u.kind == "heads" for h in u.members.get(i, [])}
            gone_channels = {c for u in removed if u.kind == "channels" for c in u.members.get(i, [])}
            kept_heads = [h for h in range(layer.heads) if h not in gone_heads]
            kept_channels = [c for c in range(layer.channels) if c not in gone_channels]
            plan["heads"].append(kept_heads)
            plan["channels"].append(kept_channels)
            if gone_heads:
                cols = head_rows(kept_heads, layer.head_dim)
                new_o = compensated(layer.o, cols, cal.heads[i], cfg.compensate, cfg.damping)
                ad.keep_heads(i, kept_heads)
                set_projection(ad.layers[i].o, *new_o)
            if gone_channels:
                new_out = compensated(layer.fc_out, torch.as_tensor(kept_channels), cal.channels[i], cfg.compensate, cfg.damping)
                ad.keep_channels(i, kept_channels)
                set_projection(ad.layers[i].fc_out, *new_out)
        return plan


def select(queues: list[list[Unit]], need: float) -> list[Unit]:
    """Greedy knapsack: repeatedly take, among the fronts of all lists, the unit of least importance per cost, until
    the removed cost covers `need` (Kwon et al. rank by Fisher importance under a cost constraint the same way)."""
    heap = [(q[0].score / max(q[0].cost, 1e-12), n, 0) for n, q in enumerate(queues) if q]
    heapq.heapify(heap)
    taken, spent = [], 0.0
    while heap and spent < need:
        _, n, j = heapq.heappop(heap)
        unit = queues[n][j]
        taken.append(unit)
        spent += unit.cost
        if j + 1 < len(queues[n]):
            nxt = queues[n][j + 1]
            heapq.heappush(heap, (nxt.score / max(nxt.cost, 1e-12), n, j + 1))
    if spent < need:
        raise UsageError("width_prune: removing every head and channel that may go does not meet the budget; ask for "
                         "less, allow both heads and mlp, or combine with layer_prune")
    return taken
