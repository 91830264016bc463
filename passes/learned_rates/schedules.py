"""Hard schedules and the rates behind them: token_merge's hand schedules at a budget (the search's starts), the
schedule a set of rates gives under a tilt, and the tilt that puts it on the budget (used every search step, at the
end, and by latency re-targets)."""

from __future__ import annotations

import torch

from compressor.errors import UsageError
from compressor.program.token_cost import hard_counts, smallest_rate

from .exchange import TokenSchedule
from .rates import KeptCounts
from .search import layer_counts

DECAYS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)  # hand schedules the search may start from (token_merge's decay)


def hand_schedules(tokens: int, layers: int, protected: int, cost, target: float, from_second: bool = False) -> list[list[int]]:
    """token_merge's constant schedules (every decay in DECAYS), each with the smallest first-layer r meeting the
    budget (FLOPs or table latency), as per-layer reduction counts; `from_second`: shifted one block later (pruning
    never acts in the first block), r found for that shape."""
    from compressor.passes.token_merge import constant_schedule

    def shape(r: int, decay: float) -> list[int]:
        s = constant_schedule(r, tokens, layers, protected, decay)
        return [0] + s[:-1] if from_second else s

    out = []
    for decay in DECAYS:
        found = smallest_rate(lambda r: shape(r, decay),
                              lambda s: cost.fraction(hard_counts([0] * layers, s, tokens)) <= target, tokens, start=1)
        if found is not None:
            out.append(found)
    return out or [shape(tokens, 1.0)]


def warm_start(prune, merge, score, tokens: int, layers: int, protected: int, cost, target: float) -> dict:
    """Centre the rates on the best hand schedule: token_merge's constant schedules at the budget, as merging and
    (where pruning is learned) as pruning from the second block, each scored by `score` (the exchange inputs); the
    other reduction starts at none. Returns the chosen start and every start's loss."""
    starts = []
    if merge is not None:
        starts += [("merge", s) for s in hand_schedules(tokens, layers, protected, cost, target)]
    if prune is not None:
        starts += [("prune", s) for s in hand_schedules(tokens, layers, protected, cost, target, from_second=True)]
    scored = []
    for kind, schedule in starts:
        none = (0,) * layers
        scored.append((score(TokenSchedule(tuple(schedule) if kind == "prune" else none,
                                      tuple(schedule) if kind == "merge" else none)), kind, schedule))
    loss, kind, schedule = min(scored, key=lambda t: t[0])
    start_rates(prune, merge, kind, schedule, tokens, layers)
    return {"kind": kind, "schedule": schedule, "loss": round(loss, 6),
            "candidates": [{"kind": k, "first": s[0] if k == "merge" else s[1], "loss": round(v, 6)} for v, k, s in scored]}


def centre(prune, merge, s: TokenSchedule, tokens: int) -> None:
    """Centre the rates on a hard schedule (kept counts after each block's pruning, and after its merging): only
    about it, as KeptCounts.start_at is one-sided at the ends of the candidates; used where the rates are tilted on
    from the kept schedule (a latency re-target), never to produce the kept schedule itself."""
    after_prune, after_merge, n = [], [], tokens
    for p, r in zip(s.prunes, s.merges):
        after_prune.append(n - p)
        after_merge.append(n - p - r)
        n -= p + r
    if prune is not None:
        prune.start_at(after_prune)
    if merge is not None:
        merge.start_at(after_merge)


def start_rates(prune, merge, kind: str, schedule: list[int], tokens: int, layers: int) -> None:
    kept = [tokens - sum(schedule[:i + 1]) for i in range(layers)]
    for rates, name in ((merge, "merge"), (prune, "prune")):
        if rates is not None:
            rates.start_at(kept if name == kind else [tokens] * layers)


def schedule_at(prune: KeptCounts | None, merge: KeptCounts | None, tokens: int, protected: int,
                tilt: float) -> tuple[list[int], list[int]]:
    """The hard schedule (prunes, merges) the rates give, every distribution tilted by `tilt`."""
    with torch.no_grad():
        kp = prune.expected(tilt).tolist() if prune is not None else None
        km = merge.expected(tilt).tolist() if merge is not None else None
    layers = len(kp if kp is not None else km)
    prunes, merges, n = [], [], tokens
    for i in range(layers):
        n_mid, n_out = layer_counts(n, int(kp[i]) if kp else None, int(km[i]) if km else None, protected, i)
        prunes.append(n - n_mid)
        merges.append(n_mid - n_out)
        n = n_out
    return prunes, merges


def fit_budget(prune, merge, tokens, protected, cost, target: float) -> tuple[float, tuple[list[int], list[int]]]:
    """The tilt (and its schedule) whose cost (FLOPs or table latency) is the largest not above the target, by
    bisection (the fraction falls as the tilt grows)."""
    def fraction(t: float) -> float:
        return cost.fraction(hard_counts(*schedule_at(prune, merge, tokens, protected, t), tokens))

    lo, hi = -8.0, 8.0
    if fraction(hi) > target:
        most = fraction(hi)
        raise UsageError(f"learned_rates: keeping {target:.0%} of the {cost.what} is out of reach; at least {most:.0%} "
                         f"remain with {tokens} tokens (enable prune, or raise the budget)")
    if fraction(lo) <= target:
        return lo, schedule_at(prune, merge, tokens, protected, lo)
    for _ in range(40):
        mid = (lo + hi) / 2
        if fraction(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi, schedule_at(prune, merge, tokens, protected, hi)
