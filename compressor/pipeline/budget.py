"""`compress run --budget KEY=VALUE`: the compiler picks and tunes passes to meet a stated budget on this machine.

Analytic budgets (`flops`, `params`) become pass options directly. Measured budgets (`speedup`, `latency_ms`)
are met by a short search: compile, time the artifact against its dense export on this machine's onnxruntime,
rescale the FLOPs target by the speed-up still missing, and repeat (a few attempts); the closest attempt is
published only if it lands within the tolerance, otherwise nothing is written and the run exits 3. The manifest
records `budget: {requested, measured}` either way it is published. `flops` and `params` are ceilings (keep at
most this fraction, within the tolerance); a measured speed-up must land within the tolerance of the request.

Timing holds under load: the artifact and its dense baseline run interleaved (A B, B A, ...), the speed-up is a ratio
of medians, rounds are added while the paired ratios spread wide (up to a cap), and the spread and the resulting
uncertainty are recorded in `budget.measured`; each attempt is one line on stderr (`log`), and a miss, or a hit, whose
timing was noisier than the tolerance says so.

If merging alone misses a measured budget (or fails the recipe's validation bars) on an encoder whose recipe sets no
`[export]` rewrites, the search runs once more with fusions and INT8 weights.

Which passes: encoders reduce tokens (`learned_rates` when asked for, else `token_merge` to a FLOPs target) and
fall back on structured width pruning when token reduction alone cannot reach the target; language models prune
width (`width_prune`), the one structured pass whose FLOPs and parameters both follow the budget. A `params`
budget always drives `width_prune`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from compressor.errors import UsageError, ValidationFailed
from compressor.runtime.artifact import MANIFEST
from compressor.targets import target_of

KEYS = ("speedup", "flops", "params", "latency_ms")
TOLERANCE = 0.05  # measured speed-up may miss the requested one by 5% (the bar)
ATTEMPTS = 6


AGAINST = ("static", "fused", "fused_int8")  # the dense deployment a speed-up budget is measured against


@dataclass(frozen=True)
class Budget:
    key: str
    value: float
    tolerance: float = TOLERANCE
    against: str = "static"

    @property
    def measured(self) -> bool:
        return self.key in ("speedup", "latency_ms")

    def to_json(self) -> dict:
        out = {self.key: self.value, "tolerance": self.tolerance}
        if self.key == "speedup":
            out["against"] = self.against
        return out


def parse_budget(spec: str) -> Budget:
    """KEY=VALUE, and for a speed-up optionally `,against=static|fused|fused_int8` (default static: the dense
    export at the artifact's shapes; fused: that model exported as optimum does and fused by onnxruntime; fused_int8:
    also INT8)."""
    main, _, rest = spec.partition(",")
    against = "static"
    if rest:
        name, sep, value = rest.partition("=")
        if name.strip() != "against" or not sep or value.strip() not in AGAINST:
            raise UsageError(f"--budget takes KEY=VALUE[,against={'|'.join(AGAINST)}]; got '{spec}'")
        against = value.strip()
    budget = _parse_key_value(main, spec)
    if rest and budget.key != "speedup":
        raise UsageError(f"--budget against= applies to speedup budgets (a ratio to a dense deployment), not {budget.key}")
    return Budget(budget.key, budget.value, against=against)


def _parse_key_value(main: str, spec: str) -> Budget:
    key, sep, value = main.partition("=")
    key = key.strip()
    if not sep or key not in KEYS:
        raise UsageError(f"--budget takes KEY=VALUE with KEY one of {', '.join(KEYS)}; got '{spec}'")
    try:
        v = float(value)
    except ValueError:
        raise UsageError(f"--budget {key} needs a number, got '{value}'") from None
    if key in ("flops", "params") and not 0.0 < v < 1.0:
        raise UsageError(f"--budget {key}={v} is the fraction of the dense model to keep: it must lie strictly between 0 and 1")
    if key == "speedup" and v <= 1.0:
        raise UsageError(f"--budget speedup={v} asks for no speed-up; give a value above 1, e.g. speedup=1.5")
    if key == "latency_ms" and v <= 0:
        raise UsageError(f"--budget latency_ms must be positive, got {v}")
    return Budget(key, v)


def check_budget_recipe(recipe) -> None:
    """A budget picks the passes: a recipe that names its own is refused (one line), before anything loads."""
    if recipe.passes:
        raise UsageError("--budget picks the passes itself; give either --budget or passes (--pass or a recipe's [[passes]]), not both")
    from compressor.pipeline.recipe import recipe_target

    if recipe_target(recipe).speech:
        raise UsageError("--budget does not apply to speech models yet; give token_merge a rate (e.g. --pass token_merge:r=150)")


def passes_for(handle, keep_flops: float | None = None, keep_params: float | None = None) -> list:
    """The passes that bring `handle` to a FLOPs or parameter fraction of its dense self."""
    from compressor.passes import TokenMerge, WidthPrune

    if keep_params is not None:
        return [WidthPrune(params=keep_params)]
    if handle.target.decoder:
        return [WidthPrune(flops=keep_flops)]
    reachable = max_token_reduction(handle)
    if 1.0 - keep_flops <= reachable:
        return [TokenMerge(reduction=1.0 - keep_flops)]
    # token merging goes as far as it can; width pruning takes the rest
    rest = keep_flops / (1.0 - reachable * 0.95)
    if not 0.0 < rest < 1.0:
        raise UsageError(f"--budget: keeping {keep_flops:.0%} of the FLOPs is out of reach for this model")
    return [WidthPrune(flops=rest), TokenMerge(reduction=reachable * 0.95)]


def max_token_reduction(handle) -> float:
    """The largest FLOPs reduction token merging alone reaches on this model (every layer merging all it may)."""
    from compressor.passes.token_merge import constant_schedule
    from compressor.program.token_cost import TokenFlops

    most = constant_schedule(handle.num_tokens, handle.num_tokens, handle.num_layers, handle.adapter.protected_per_sample)
    return TokenFlops.of(handle).reduction(most)


def run_budget(recipe, budget: Budget, output, *, force: bool = False, progress=None, log=None) -> dict:
    """Build the artifact for `budget`; returns its manifest (with the `budget` section). `log` receives one line per
    attempt of a measured budget (what was kept, what was measured and how noisy the timing was)."""
    from compressor.artifact.publish import check_output
    from compressor.artifact.lock import output_lock

    check_budget_recipe(recipe)
    output = Path(output)
    with output_lock(output):  # held from before the first attempt to the publish (reentrant under `compress run`)
        check_output(output, force)
        return _run_budget_locked(recipe, budget, output, progress, log or (lambda line: None))


def _run_budget_locked(recipe, budget: Budget, output: Path, progress, log) -> dict:
    from compressor.artifact.publish import publish
    from compressor.pipeline.build import build as build_once
    from compressor.pipeline.recipe import resolve_recipe

    step = progress or (lambda msg: None)
    resolved = [resolve_recipe(recipe)]  # the INT8 retry swaps in the same recipe with other [export] rewrites

    def build(keep: float | None, folder: Path) -> dict:
        def chosen(handle):
            return passes_for(handle, keep_params=budget.value) if budget.key == "params" else passes_for(handle, keep_flops=keep)

        return build_once(resolved[0], folder, passes=chosen, force=True, progress=progress,
                          record={"budget": budget.to_json()})

    def with_int8() -> None:
        resolved[0] = resolved[0].with_options(dict(INT8))

    scratch = [output.with_name(f".{output.name}.budget-{i}") for i in range(ATTEMPTS)]
    try:
        if not budget.measured:
            manifest = build(budget.value, scratch[0])
            chosen, measured = scratch[0], analytic_measure(manifest)
            missed = max(0.0, measured[budget.key] - budget.value) / budget.value  # a ceiling: keeping less is meeting it
        else:
            chosen, manifest, measured, missed = search_speed_with_int8(resolved[0], budget, build, scratch, step, log, with_int8)
        manifest["budget"] = {"requested": budget.to_json(), "measured": measured, "within_tolerance": missed <= budget.tolerance}
        if missed > budget.tolerance:
            raise ValidationFailed(f"budget missed: requested {budget.key}={budget.value}, measured {measured[budget.key]:.3g} "
                                   f"({missed:.0%} off, tolerance {budget.tolerance:.0%}){noise_note(measured, budget)}; "
                                   f"nothing published")
        if noise_note(measured, budget):
            log(f"warning: measured {measured[budget.key]:.3g} is within the tolerance, but{noise_note(measured, budget)[1:]}")
        (chosen / MANIFEST).write_text(json.dumps(manifest, indent=2))
        publish(chosen, output)
        return manifest
    finally:
        for s in scratch:
            shutil.rmtree(s, ignore_errors=True)


def noise_note(measured: dict, budget: Budget) -> str:
    """Why a measured miss may be the machine's noise rather than the artifact: said when the timing's own
    uncertainty is as wide as the tolerance (another job on the cores), so a user knows to rerun it on a quiet one."""
    uncertainty = measured.get("uncertainty")
    if uncertainty is None or uncertainty * 2 <= budget.tolerance:
        return ""
    return (f"; the timings were noisy (+-{uncertainty:.0%} at 95% over {measured.get('rounds')} interleaved rounds, "
            f"spread {measured.get('spread', 0):.0%}): another job shares this machine? measured budgets want a quiet one")


INT8 = {"fuse": True, "quantize": "int8-dynamic"}


def search_speed_with_int8(resolved, budget: Budget, build, scratch: list[Path], step, log=None, with_int8=None):
    """The speed search as the recipe exports; for an encoder whose recipe sets no deployment rewrites, if that
    misses (or every attempt fails validation), once more with fusions and INT8 weights, which buy speed for less
    quality than more token reduction does (the recipe's validation bars still apply)."""
    try:
        found = search_speed(budget, build, scratch, step, log)
        if found[3] <= budget.tolerance or resolved.recipe.deploy or resolved.target.decoder:
            return found
    except ValidationFailed:
        if resolved.recipe.deploy or resolved.target.decoder:
            raise
    step("merging alone misses the budget: searching again with fusions and INT8 weights")
    (log or (lambda line: None))("budget: merging alone misses it; searching again with fusions and INT8 weights")
    with_int8()
    return search_speed(budget, build, scratch, step, log)


def analytic_measure(manifest: dict) -> dict:
    """The FLOPs and parameter fractions the compiled artifact keeps, from its manifest."""
    return {"flops": manifest["flops"]["compressed"] / manifest["flops"]["dense"],
            "params": manifest["params"]["compressed"] / manifest["params"]["dense"]}


def search_speed(budget: Budget, build, scratch: list[Path], step, log=None):
    """Rescale the FLOPs target by the speed-up still missing until the measured one lands within tolerance. Each
    attempt is one line to `log`: what it kept, what it measured, how noisy the timing was."""
    log = log or (lambda line: None)
    target = budget.value if budget.key == "speedup" else None  # latency_ms: known once the dense model is timed
    keep, best, tried = (1.0 / target if target else 0.6), None, []
    for i, folder in enumerate(scratch):
        keep = min(max(keep, 0.05), 0.95)
        step(f"budget attempt {i + 1}: keeping {keep:.0%} of the dense FLOPs")
        try:
            manifest = build(keep, folder)
        except ValidationFailed as e:  # this much reduction breaks the quality bar
            log(f"budget attempt {i + 1}: keeping {keep:.0%} of the dense FLOPs fails validation")
            if best is not None:
                step(f"budget attempt {i + 1} failed validation; keeping attempt with {best[2]['speedup']:.2f}x")
                break
            if i == len(scratch) - 1:
                raise ValidationFailed(f"budget: keeping {keep:.0%} of the FLOPs still fails validation ({e}); "
                                       "or lower the budget") from None
            step(f"budget attempt {i + 1} failed validation; reducing less")
            keep = (keep + 1.0) / 2  # half way back towards dense
            continue
        step(f"budget attempt {i + 1}: timing it against the dense model, interleaved")
        bench = measure_speed(folder, budget.against, precision=budget.tolerance / 2)
        if target is None:
            target = bench["dense_ms"] / budget.value
            if target <= 1.0:
                raise UsageError(f"--budget latency_ms={budget.value}: the dense model already runs in {bench['dense_ms']:.0f} ms here")
        speedup = bench["speedup"]
        measured = {"speedup": speedup, "latency_ms": bench["compressed_ms"], "dense_ms": bench["dense_ms"],
                    "flops": analytic_measure(manifest)["flops"], "spread": bench["spread"],
                    "uncertainty": bench["uncertainty"], "rounds": bench["rounds"]}
        missed = abs(speedup - target) / target
        noisy = " (noisy: wider than the tolerance)" if bench["uncertainty"] * 2 > budget.tolerance else ""
        log(f"budget attempt {i + 1}: keeping {keep:.0%} of the dense FLOPs, measured {speedup:.2f}x "
            f"+-{bench['uncertainty']:.1%} over {bench['rounds']} interleaved rounds{noisy} "
            f"({bench['compressed_ms']:.1f} ms vs dense {bench['dense_ms']:.1f} ms), requested {target:.2f}x")
        if best is None or missed < best[3]:
            best = (folder, manifest, measured, missed)
        if missed <= budget.tolerance:
            break
        tried.append((keep, speedup))
        keep = next_keep(tried, target)
    return best


def measure_speed(folder: Path, against: str, precision: float = TOLERANCE / 2) -> dict:
    """The artifact's speed-up over the dense deployment the budget names (`speedup`, `dense_ms`, `compressed_ms`):
    the dense export at its shapes (static), or that model fused by onnxruntime, in FP32 or INT8; language models by
    a 512-token prefill, text encoders on passages that fill the compiled length (static: one held-out batch),
    images on held-out images. Timed by time_paired (interleaved, ratio of medians, rounds added while the spread is
    wide); `spread`, `uncertainty` and `rounds` say how noisy the machine was."""
    from compressor.measure.timing import time_paired
    from compressor.runtime.artifact import read_manifest

    folder = Path(folder)
    manifest = read_manifest(folder)
    runs, what = speed_runners(folder, manifest, against)
    got = time_paired(runs, "dense", precision=precision,
                      **({"min_rounds": 5, "max_rounds": 24} if target_of(manifest).decoder else {}))
    return {"against": against, "distribution": what, "dense_ms": got["ms"]["dense"],
            "compressed_ms": got["ms"]["compressed"], "speedup": got["ratio"]["compressed"],
            "spread": got["spread"]["compressed"], "uncertainty": got["uncertainty"]["compressed"], "rounds": got["rounds"]}


def speed_runners(folder: Path, manifest: dict, against: str, threads: int = 2) -> tuple[dict, str]:
    """Zero-argument callables for the dense deployment ("dense") and the artifact ("compressed"), and what they run."""
    from compressor.measure.baselines import dense_export
    from compressor.runtime.model import make_session

    dense_path = dense_export(manifest)
    if target_of(manifest).decoder:
        from compressor.measure.baselines import dense_decoder_fused
        from compressor.measure.bench import _dense_decoder_layout
        from compressor.runtime.lm import CausalLM
        from compressor.sources.lm_data import held_out_windows

        if against != "static":
            dense_path = dense_decoder_fused(manifest, dense_path, int8=against == "fused_int8")[0]
        dense = CausalLM(dense_path.parent, dict(manifest, model_file=dense_path.name, **_dense_decoder_layout(dense_path, manifest)),
                         threads=threads)
        ours = CausalLM(folder, manifest, threads=threads)
        window = held_out_windows(folder / manifest["preprocess"]["tokenizer"], 512, 1)[0]
        return {"dense": lambda: dense.logits(window), "compressed": lambda: ours.logits(window)}, \
            "a 512-token prefill of held-out Wikipedia text"
    ours = make_session(folder / manifest["model_file"], threads=threads)
    if against == "static":
        from compressor.measure.bench import held_out_batch

        feeds = held_out_batch(folder, manifest)
        dense = make_session(dense_path, threads=threads)
        return {"dense": lambda: dense.run(None, feeds), "compressed": lambda: ours.run(None, feeds)}, "one held-out batch"
    from compressor.measure.baseline_bench import Batches, _preprocess, length_batches, length_distributions, static_batches
    from compressor.measure.baselines import dense_fused, dense_fused_int8

    dense = make_session(dense_fused(manifest)[0] if against == "fused" else dense_fused_int8(manifest), threads=threads)
    distributions = length_distributions(manifest, 2 * manifest["shapes"]["batch"])
    what, raw = distributions["long" if "long" in distributions else "images"]
    feeds, b = _preprocess(folder, manifest, raw), manifest["shapes"]["batch"]
    dense_runs, our_runs = Batches(dense, length_batches(feeds, b)), Batches(ours, static_batches(feeds, b))
    return {"dense": dense_runs.run, "compressed": our_runs.run}, what


def next_keep(tried: list[tuple[float, float]], target: float) -> float:
    """The next FLOPs fraction to try: interpolated between the closest attempts on either side of the target
    speed-up once there are such, else the last one rescaled by the speed-up still missing."""
    below = [t for t in tried if t[1] < target]
    above = [t for t in tried if t[1] >= target]
    if below and above:
        (k0, s0), (k1, s1) = max(below, key=lambda t: t[1]), min(above, key=lambda t: t[1])
        return k0 + (k1 - k0) * (target - s0) / max(s1 - s0, 1e-9)
    keep, speedup = tried[-1]
    return keep * speedup / target
