"""layer_prune: remove whole transformer blocks, chosen on calibration data (ShortGPT, Gromov et al., SLEB).

- `block_influence` (ShortGPT): a block whose output is nearly its input (cosine over real tokens) does little;
  remove the least influential.
- `angular` (Gromov et al.): remove the run of n consecutive blocks whose input and output are closest in angular
  distance arccos(cos) / pi.
- `greedy` (SLEB): remove one block at a time, each time the one whose removal hurts the calibration loss least
  (language models: next-token NLL of the calibration text; encoders: 1 - cosine of the pooled output to the dense
  model's), re-scoring after every removal.
- `depth`: the deepest blocks, no data: the baseline that shows what the metrics add.
The first and last blocks stay unless told otherwise (SLEB's default). Budget: a number of blocks, or a fraction of
the dense model's parameters or FLOPs to keep.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from compressor.errors import UsageError
from compressor.models import DepthPrunable
from compressor.pipeline.pass_base import Pass, PassResult, register

from .pruning.budget import block_cost, resolve_budget
from .pruning.calibration import calibration_batches, output_loss, walk

METRICS = ("block_influence", "angular", "greedy", "depth")


@dataclass
class LayerPruneConfig:
    blocks: int | None = field(default=None, metadata={"help": "how many blocks to remove (or give params / flops)"})
    params: float | None = field(default=None, metadata={"help": "fraction of the dense model's parameters to keep, e.g. 0.85"})
    flops: float | None = field(default=None, metadata={"help": "fraction of the dense model's FLOPs (compiled shapes) to keep"})
    metric: str = field(default="block_influence", metadata={"help": "block_influence (ShortGPT), angular (Gromov et al.: a contiguous run), greedy (SLEB: calibration loss, re-scored after each removal), or depth (the deepest blocks: a baseline without data)"})
    keep_first: bool = field(default=True, metadata={"help": "never remove the first block"})
    keep_last: bool = field(default=True, metadata={"help": "never remove the last block"})
    calibration_samples: int = field(default=32, metadata={"help": "calibration inputs: Wikipedia calibration windows (language models) or paragraphs (text encoders), random crops of the built-in calibration photographs (vision), or drawn from [data] calibration when given; none with metric = depth"})
    calibration_len: int = field(default=256, metadata={"help": "tokens per calibration window (language models)"})
    seed: int = field(default=42, metadata={"help": "seed for the calibration windows or paragraphs"})
    batch: int = field(default=8, metadata={"help": "calibration inputs per forward pass"})

    def __post_init__(self):
        given = [n for n in ("blocks", "params", "flops") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one budget: blocks, params or flops (got {', '.join(given) or 'none'})")
        if self.blocks is not None and self.blocks < 1:
            raise ValueError(f"blocks must be at least 1, got {self.blocks}")
        for name in ("params", "flops"):
            v = getattr(self, name)
            if v is not None and not 0.0 < v < 1.0:
                raise ValueError(f"{name} is the fraction of the dense model to keep and must lie in (0, 1), got {v}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.calibration_samples < 1 or self.batch < 1 or self.calibration_len < 8:
            raise ValueError("calibration_samples and batch must be >= 1 and calibration_len >= 8")


@register
class LayerPrune(Pass):
    name = "layer_prune"
    summary = "remove whole blocks by importance on calibration data (ShortGPT block influence, angular distance, SLEB greedy)"
    Config = LayerPruneConfig
    ensures = frozenset({"layers_pruned"})
    runs_before = {  # what layer_prune.check refuses to follow, as rules on the recipe's order
        "token_merge": "the token schedule is per block",
        "token_prune": "the token schedule is per block",
        "learned_rates": "the token schedule is per block",
        "slicegpt[mode=per_layer]": "its shortcut matrices tie each block to the rotations of its neighbours",
    }

    def calibration_need(self, target):
        return None if self.config.metric == "depth" else ("calibration_samples", self.config.calibration_samples)

    def check(self, handle) -> None:
        super().check(handle)
        if not isinstance(handle.adapter, DepthPrunable):
            raise UsageError(f"layer_prune does not apply to a {handle.adapter.family} model (its adapter cannot remove blocks)")
        if handle.plan.active:
            raise UsageError("layer_prune must come before token_merge/token_prune in the recipe: the merge schedule is per block")
        if handle.adapter.has_shortcuts:
            raise UsageError("layer_prune must come before slicegpt's per_layer mode: its shortcut matrices tie each "
                             "block to the rotations of its neighbours")
        if self.config.blocks is not None and self.config.blocks >= handle.num_layers:
            raise UsageError(f"layer_prune: blocks = {self.config.blocks} would remove every block of this "
                             f"{handle.num_layers}-block model; remove fewer")
        allowed = self._candidates(handle.num_layers)
        if self.config.blocks is not None and self.config.blocks > len(allowed):
            keep = [w for w, on in (("first", self.config.keep_first), ("last", self.config.keep_last)) if on]
            raise UsageError(f"layer_prune: blocks = {self.config.blocks} but only {len(allowed)} of the "
                             f"{handle.num_layers} blocks may go" + (f" (keep_{' and keep_'.join(keep)} are on)" if keep else "")
                             + "; remove fewer blocks")

    def _candidates(self, layers: int) -> list[int]:
        cfg = self.config
        return [i for i in range(layers) if not (cfg.keep_first and i == 0) and not (cfg.keep_last and i == layers - 1)]

    def run(self, handle, ctx) -> PassResult:
        cfg: LayerPruneConfig = self.config
        start = time.perf_counter()
        layers = handle.num_layers
        candidates = self._candidates(layers)
        if cfg.blocks is not None:
            kind, need, costs = "blocks", float(cfg.blocks), [1.0] * layers
            budget = None
        else:
            budget = resolve_budget(handle, self.name, cfg.params, cfg.flops)
            kind, need = budget.kind, budget.to_remove
            costs = [block_cost(handle, i, kind) for i in range(layers)]
            if sum(costs[i] for i in candidates) < need:
                raise UsageError(f"layer_prune: removing every block that may go leaves more than {kind} = "
                                 f"{budget.keep}; ask for more, or combine with width_prune or slicegpt")
        batches = [] if cfg.metric == "depth" else calibration_batches(ctx.calibration, cfg.calibration_samples, cfg.batch, cfg.calibration_len, cfg.seed)
        info: dict = {"metric": cfg.metric}
        if cfg.metric != "depth":  # depth reads no data
            info["calibration"] = ctx.calibration.description()
        with torch.no_grad():
            if cfg.metric == "depth":
                removed = _cheapest(sorted(candidates, reverse=True), costs, need)
            elif cfg.metric == "greedy":
                removed, trace = self._greedy(handle, ctx, batches, candidates, costs, need)
                info["greedy_losses"] = trace
            else:
                sims = boundary_cosines(handle, batches)
                if cfg.metric == "block_influence":
                    influence = [1.0 - sims[i][i + 1] for i in range(layers)]
                    removed = _cheapest(sorted(candidates, key=lambda i: influence[i]), costs, need)
                    info["influence"] = [round(v, 5) for v in influence]
                else:
                    removed, distance = _angular_run(sims, candidates, costs, need)
                    info["angular_distance"] = round(distance, 5)
        if len(removed) >= layers:
            raise UsageError("layer_prune: the budget removes every block; ask for less")
        handle.adapter.remove_layers(removed)
        info.update(removed_blocks=sorted(removed), layers_before=layers, layers_after=handle.num_layers,
                    calibration_samples=cfg.calibration_samples, scoring_seconds=round(time.perf_counter() - start, 2),
                    transformers_loadable=handle.adapter.transformers_loadable)
        if budget is not None:
            info["budget"] = {"kind": budget.kind, "keep": budget.keep}
        return PassResult(modified=True, info=info)

    def _greedy(self, handle, ctx, batches, candidates, costs, need):
        """SLEB: each round removes the block whose absence costs the least calibration loss, given those already gone.
        A candidate's run starts from its own input, computed once per round (the blocks before it are unchanged)."""
        reference = [None] * len(batches) if handle.target.decoder else [walk(handle, b).output for b in batches]
        removed: set[int] = set()
        trace = []
        while sum(costs[i] for i in removed) < need:
            options = [i for i in candidates if i not in removed]
            if not options:
                break
            ctx.progress.step(f"greedy round {len(removed) + 1}: scoring {len(options)} blocks")
            kept = [i for i in range(handle.num_layers) if i not in removed]
            inputs = [dict(zip(kept, walk(handle, b, removed, keep_states=True).states)) for b in batches]
            scores = {i: sum(float(output_loss(handle, walk(handle, b, removed | {i}, start=i, x=at[i]).output, r, b[0]))
                             for b, r, at in zip(batches, reference, inputs)) / len(batches) for i in options}
            best = min(scores, key=scores.get)
            removed.add(best)
            trace.append({"block": best, "loss": round(scores[best], 5)})
        return sorted(removed), trace


def boundary_cosines(handle, batches) -> list[list[float]]:
    """Mean cosine over real tokens between the hidden states at every pair of block boundaries (i, j), i < j:
    boundary i is the input of block i (boundary L is the last block's output)."""
    n = handle.num_layers + 1
    total = torch.zeros(n, n, dtype=torch.float64)
    count = 0
    for b in batches:
        w = walk(handle, b, keep_states=True)
        mask = w.mask.reshape(-1)
        states = [torch.nn.functional.normalize(s.reshape(-1, s.shape[-1])[mask].double(), dim=-1) for s in w.states]
        for i in range(n):
            for j in range(i + 1, n):
                total[i, j] += (states[i] * states[j]).sum()
        count += int(mask.sum())
    return (total / count).tolist()


def _cheapest(order: list[int], costs: list[float], need: float) -> list[int]:
    """Blocks in order of increasing importance until their cost covers what must go."""
    out, spent = [], 0.0
    for i in order:
        if spent >= need:
            break
        out.append(i)
        spent += costs[i]
    return sorted(out)


def _angular_run(sims, candidates, costs, need) -> tuple[list[int], float]:
    """The shortest contiguous run of allowed blocks whose cost covers the budget, and among those the one whose
    input and output are closest in angular distance."""
    allowed = set(candidates)
    for n in range(1, len(candidates) + 1):
        runs = [list(range(s, s + n)) for s in range(len(sims)) if all(i in allowed for i in range(s, s + n))]
        runs = [r for r in runs if sum(costs[i] for i in r) >= need]
        if runs:
            def distance(r):
                return math.acos(max(-1.0, min(1.0, sims[r[0]][r[-1] + 1]))) / math.pi
            best = min(runs, key=distance)
            return best, distance(best)
    raise UsageError("layer_prune: no contiguous run of removable blocks meets the budget; ask for less or use another metric")
