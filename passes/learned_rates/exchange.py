"""Measured exchanges: the last step of the rate search, on the hard schedule itself.

A few hundred calibration inputs give the gradient search (search.py) a noisy signal, and its expected counts are
rounded and tilted onto the budget afterwards, so what it returns is a good schedule, not a locally best one. Here the
schedule is refined by trades between blocks at the same cost: block i takes `step` more tokens away, block j gives
back as many as the budget then allows (fewer if the cost model says so), and, where pruning is learned, a block
turns some merges into prunes or back. Every trade is scored by what the compiled program loses, 1 - cosine of its
pooled output to the dense model's, on calibration inputs the gradient steps do not draw from (unless the
calibration set is too small to spare them), and kept when it lowers it
(first improvement); the step halves when a round finds nothing, down to the rates' granularity. The schedules
tried stay valid for the static program by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

from compressor.pipeline.progress import track
from compressor.program.merging import max_merge
from compressor.program.pruning import max_prune
from compressor.program.token_cost import hard_counts

MAX_DISTANCE = 2  # blocks at most this far apart trade tokens (a schedule's shape is wrong locally; rounds carry it on)


@dataclass(frozen=True)
class TokenSchedule:
    prunes: tuple[int, ...]
    merges: tuple[int, ...]


def valid(s: TokenSchedule, tokens: int, protected: int) -> bool:
    """The caps the compiled program enforces: no prune in the first block, per-layer prune and merge caps."""
    n = tokens
    for i, (p, r) in enumerate(zip(s.prunes, s.merges)):
        if p < 0 or r < 0 or (i == 0 and p) or p > max_prune(n, protected) or r > max_merge(n - p, protected):
            return False
        n -= p + r
    return True


def trades(layers: int, learn_prune: bool, learn_merge: bool):
    """Every (kind taken, block taking more, kind given back, block giving back): a block turning one kind into the
    other, then blocks trading the same kind, nearby blocks first."""
    kinds = [k for k, on in (("merges", learn_merge), ("prunes", learn_prune)) if on]
    for d in range(0, MAX_DISTANCE + 1):
        for i in range(layers):
            for j in (i - d, i + d) if d else (i,):
                if 0 <= j < layers:
                    for take in kinds:
                        for give in kinds:
                            if (i == j) != (take == give):
                                yield take, i, give, j


def apply(s: TokenSchedule, take: str, i: int, give: str, j: int, step: int, fits, tokens: int, protected: int) -> TokenSchedule | None:
    """Block i takes `step` more of `take`; block j gives back the most of `give` (up to what it has) that keeps the
    cost within the budget. None if nothing can be given back or the result is not a valid schedule."""
    rows = {"prunes": list(s.prunes), "merges": list(s.merges)}
    rows[take][i] += step
    lo, hi = 0, rows[give][j]
    while lo < hi:  # the most x the budget allows back
        mid = (lo + hi + 1) // 2
        trial = {**rows, give: [v - mid if k == j else v for k, v in enumerate(rows[give])]}
        if fits(trial["prunes"], trial["merges"]):
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        return None
    rows[give][j] -= lo
    out = TokenSchedule(tuple(rows["prunes"]), tuple(rows["merges"]))
    return out if fits(out.prunes, out.merges) and valid(out, tokens, protected) else None


def exchange(start: TokenSchedule, start_loss: float, start_name: str, score, cost, target: float, tokens: int,
             protected: int, *, learn_prune: bool, learn_merge: bool, step: int, granularity: int,
             budget: int) -> tuple[TokenSchedule, list[dict]]:
    """Greedy trades from `start` (already scored: `start_loss`; score: schedule -> loss, lower is better), at most
    `budget` of them scored; returns the best schedule and the trades kept (the first named `start_name`), each with
    its loss."""
    def fits(prunes, merges) -> bool:
        return float(cost.fraction(hard_counts(prunes, merges, tokens))) <= target + 1e-9

    best, loss = start, start_loss
    kept = [{"trade": start_name, "loss": round(loss, 6)}]
    ticks = iter(track(range(budget), "trading tokens between blocks"))
    scored = 0
    while scored < budget:
        improved = False
        for take, i, give, j in trades(len(best.merges), learn_prune, learn_merge):
            cand = apply(best, take, i, give, j, step, fits, tokens, protected)
            if cand is None:
                continue
            if scored >= budget:
                break
            got = score(cand)
            scored += 1
            next(ticks, None)
            if got < loss - 1e-7:
                best, loss, improved = cand, got, True
                kept.append({"trade": f"block {i} {take} +{step}, block {j} {give} back", "loss": round(loss, 6)})
                break  # first improvement: trades are re-listed around the new schedule
        if not improved:
            if step <= granularity or scored >= budget:
                break
            step = max(granularity, step // 2)
    ticks.close()
    return best, kept
