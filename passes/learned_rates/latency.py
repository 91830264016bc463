"""A latency budget for learned_rates: the fraction of the dense model's measured latency to keep, turned into the
FLOPs fraction the search spends.

Token reduction saves time roughly in proportion to the FLOPs it removes, but not all of the time is in the blocks
(embeddings, the matching itself, the head) and onnxruntime runs small matrices less efficiently. So the dense
program and token_merge's constant schedule at about the asked-for fraction (at most half the FLOPs) are exported
and timed, interleaved, at the compiled shapes; the line through the two points gives each FLOPs fraction its latency, and the FLOPs target is
the fraction whose predicted latency is the budget. After the search, the compiled schedule is timed against the
dense program once more; while it misses the budget by more than LATENCY_TOLERANCE the line is re-drawn through that
measurement and the learned rates are tilted to the new FLOPs target (no new search). The manifest records the
prediction and every measurement.
"""

from __future__ import annotations

import dataclasses

from compressor.errors import UsageError
from compressor.export.timing import LATENCY_ATTEMPTS, LATENCY_TOLERANCE, time_handles
from compressor.program.encoder import TokenPlan

from compressor.program.token_cost import TokenFlops, hard_counts



def reference_schedule(handle, cost: TokenFlops, keep: float) -> list[int]:
    """token_merge's constant r whose FLOPs fraction is closest to `keep`, or to half the FLOPs if that is lower (a
    second point for the line, far enough from dense that the difference stands out of the timing noise)."""
    keep = min(keep, 0.5)
    from compressor.passes.token_merge import constant_schedule

    tokens, layers, protected = handle.num_tokens, handle.num_layers, handle.adapter.protected_per_sample
    options = [constant_schedule(r, tokens, layers, protected) for r in range(1, tokens)]
    return min(options, key=lambda s: abs(cost.fraction(hard_counts([0] * layers, s, tokens)) - keep))


def flops_for_latency(handle, cost: TokenFlops, keep: float, threads: int, proportional: bool) -> tuple[float, dict]:
    """The FLOPs fraction whose predicted latency is `keep` of the dense model's, and the measurements behind it."""
    merges = reference_schedule(handle, cost, keep)
    reference = dataclasses.replace(handle, plan=TokenPlan(merges=merges, proportional_attention=proportional))
    ms = time_handles({"dense": handle, "reference": reference}, threads=threads)
    f_ref = cost.fraction(hard_counts([0] * len(merges), merges, handle.num_tokens))
    slope = (ms["dense"] - ms["reference"]) / max(1.0 - f_ref, 1e-9)  # ms per unit of FLOPs fraction
    if slope <= 0:
        raise UsageError(f"learned_rates: merging did not make this model faster here ({ms['reference']:.1f} ms vs "
                         f"{ms['dense']:.1f} ms dense at {f_ref:.0%} of the FLOPs); use a flops budget")
    fixed = ms["dense"] - slope  # the latency no token reduction removes
    target = (keep * ms["dense"] - fixed) / slope
    if not 0.0 < target < 1.0:
        raise UsageError(f"learned_rates: latency = {keep} is out of reach by token reduction here: {fixed / ms['dense']:.0%} "
                         f"of the dense latency does not shrink with tokens (measured); raise the budget")
    return target, {"measured_ms": {k: round(v, 3) for k, v in ms.items()}, "reference_merges": merges,
                    "reference_flops_fraction": round(f_ref, 4), "fixed_fraction": round(fixed / ms["dense"], 4),
                    "flops_target": round(target, 4)}


def measured_ratio(handle, threads: int) -> dict:
    """The compiled schedule's latency against the dense program's, timed interleaved."""
    dense = dataclasses.replace(handle, plan=TokenPlan())
    ms = time_handles({"dense": dense, "learned": handle}, threads=threads)
    return {"check_ms": {k: round(v, 3) for k, v in ms.items()}, "measured_ratio": round(ms["learned"] / ms["dense"], 4)}


def retarget(attempts: list[dict], keep: float) -> float | None:
    """The next FLOPs target, or None when the last measurement is within LATENCY_TOLERANCE (or the attempts are spent, or
    the line through the dense point and the last one cannot reach the budget): the line is re-drawn through what the
    compiled schedule actually measured, and the rates are tilted again (fit_budget; no new search)."""
    last = attempts[-1]
    if abs(last["measured_ratio"] - keep) <= LATENCY_TOLERANCE or len(attempts) >= LATENCY_ATTEMPTS:
        return None
    dense, got = last["check_ms"]["dense"], last["check_ms"]["learned"]
    slope = (dense - got) / max(1.0 - last["flops_fraction"], 1e-9)
    if slope <= 0:
        return None
    target = (keep * dense - (dense - slope)) / slope
    return target if 0.0 < target < 1.0 else None
