"""Latency of a handle's program as the artifact will run it: exported to ONNX in a temporary folder and timed with
onnxruntime at the compiled shapes, several handles interleaved in one run (the machine's load drifts), for passes
whose budgets are measured rather than counted (width_prune and learned_rates `latency`)."""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from compressor.pipeline.progress import track
from compressor.runtime.model import make_session

LATENCY_TOLERANCE = 0.04  # a measured latency budget is re-spent while the measured ratio misses it by more than this
# fraction of itself (4%: inside the 5% a speed-up budget allows)
LATENCY_ATTEMPTS = 3  # timings of the result at most


def export_for_timing(handle, path: Path) -> Path:
    """The program as the artifact will run it (decoders: the one dynamic-shape graph with a KV cache)."""
    if handle.target.decoder:
        from compressor.lower.onnx import lower_decoder_to_onnx

        return lower_decoder_to_onnx(handle.program(), handle.adapter, path)
    from compressor.lower.onnx import export_onnx

    export_onnx(handle, path.parent)
    return path.parent / "model.onnx"


def feeds_for(handle) -> dict[str, np.ndarray]:
    if handle.target.decoder:
        from compressor.lower.onnx import decoder_io_names

        names = decoder_io_names(handle.num_layers)[0]
    else:
        names = [s.name for s in handle.input_specs()]
    return {n: t.numpy() for n, t in zip(names, handle.example_inputs())}


def time_handles(handles: dict[str, object], repeats: int = 10, threads: int = 2) -> dict[str, float]:
    """Median onnxruntime ms of each handle's program at its compiled shapes, timed interleaved in one run."""
    with tempfile.TemporaryDirectory(prefix="compressor-latency-") as tmp:
        sessions, feeds = {}, {}
        for name, h in handles.items():
            folder = Path(tmp) / name
            folder.mkdir()
            sessions[name] = make_session(export_for_timing(h, folder / "model.onnx"), threads=threads)
            feeds[name] = feeds_for(h)
        times = {n: [] for n in handles}
        for _ in range(max(1, repeats // 5)):  # interleave in rounds: the machine's load drifts
            got = {n: time_interleaved({n: sessions[n]}, feeds[n], 5, 1)[n] for n in handles}
            for n in handles:
                times[n] += got[n]
    return {n: statistics.median(t) for n, t in times.items()}


def time_module_at_sizes(module, example: tuple, sizes: list[int], repeats: int = 10, threads: int = 2) -> list[float]:
    """Median onnxruntime ms of `module` at each token count in `sizes`: exported once with a dynamic axis 1 on every
    input (`example` at the largest size), then run on the examples cut to each size, sizes interleaved per round."""
    import torch

    from compressor.lower.onnx import EXPORT_LOGGERS, OPSET, quiet

    tokens = torch.export.Dim("tokens", min=2, max=example[0].shape[1])
    with tempfile.TemporaryDirectory(prefix="compressor-latency-") as tmp, quiet(*EXPORT_LOGGERS), torch.no_grad():
        path = Path(tmp) / "block.onnx"
        torch.onnx.export(module, example, dynamo=True, dynamic_shapes=tuple({1: tokens} for _ in example),
                          optimize=True, verbose=False, opset_version=OPSET).save(str(path))
        session = make_session(path, threads=threads)
        names = [i.name for i in session.get_inputs()]
        feeds = {n: {name: t[:, :n].numpy() for name, t in zip(names, example)} for n in sizes}
        for n in sizes:  # warm-up: onnxruntime plans each new shape on its first run
            session.run(None, feeds[n])
        times = {n: [] for n in sizes}
        for _ in range(repeats):
            for n in sizes:
                t = time.perf_counter()
                session.run(None, feeds[n])
                times[n].append((time.perf_counter() - t) * 1000.0)
    return [statistics.median(times[n]) for n in sizes]


# 95% half-width of a median's relative error per unit of spread (IQR / median) at one round: the median's standard
# error is 1.2533 sigma / sqrt(n) and sigma is IQR / 1.349 for a normal spread, times 1.96.
_HALF_WIDTH = 1.96 * 1.2533 / 1.349


def time_paired(runs: dict[str, Callable[[], object]], reference: str, *, warmup: int = 2, min_rounds: int = 8,
                max_rounds: int = 40, precision: float = 0.025, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Time callables against `reference` so that the comparison holds while other jobs load the machine.

    Interleaved: each round runs every callable once, in reverse order every other round (A B, B A, ...), so a drift
    in the load falls on both sides alike. Compared as a ratio of medians (reference median / candidate median), which
    a few runs slowed by another job hardly move. Each round also gives a paired ratio (its reference time over its
    candidate time); their spread (IQR / median) says how noisy the machine is, and from it the 95% uncertainty of the
    ratio (about 1.82 x spread / sqrt(rounds)). Rounds are added while any uncertainty exceeds `precision`, up to
    `max_rounds`; a caller compares the uncertainty with its tolerance to tell a noisy measurement from a miss.

    Returns {"ms": median ms per name, "ratio": reference / name, "spread", "uncertainty" (per name but the
    reference), "rounds", "order": the names in the order they ran in the first two rounds}.
    """
    names = list(runs)
    if reference not in runs or len(names) < 2:
        raise ValueError("time_paired needs the reference and at least one candidate")
    for _ in range(warmup):
        for n in names:
            runs[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    order: list[str] = []
    rounds = 0
    while True:
        for n in (names if rounds % 2 == 0 else names[::-1]):
            start = clock()
            runs[n]()
            times[n].append((clock() - start) * 1000.0)
            if rounds < 2:
                order.append(n)
        rounds += 1
        if rounds >= max_rounds or (rounds >= min_rounds and max(_paired(times, reference, n, rounds)[1]
                                                                  for n in names if n != reference) <= precision):
            break
    ms = {n: statistics.median(t) for n, t in times.items()}
    out = {"ms": ms, "ratio": {}, "spread": {}, "uncertainty": {}, "rounds": rounds, "order": order}
    for n in names:
        if n != reference:
            spread, uncertainty = _paired(times, reference, n, rounds)
            out["ratio"][n] = ms[reference] / ms[n]
            out["spread"][n], out["uncertainty"][n] = spread, uncertainty
    return out


def _paired(times: dict[str, list[float]], reference: str, name: str, rounds: int) -> tuple[float, float]:
    """(spread, uncertainty) of the per-round ratios reference / name."""
    ratios = [r / max(c, 1e-9) for r, c in zip(times[reference], times[name])]
    if len(ratios) < 2:
        return float("inf"), float("inf")
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    spread = (q3 - q1) / statistics.median(ratios)
    return spread, _HALF_WIDTH * spread / math.sqrt(rounds)


def time_interleaved(sessions: dict, feeds: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    names = list(sessions)
    for _ in range(warmup):
        for n in names:
            sessions[n].run(None, feeds)
    times = {n: [] for n in names}
    for i in track(range(repeats), f"timing {len(names)} models"):
        order = names if i % 2 == 0 else names[::-1]
        for n in order:
            t = time.perf_counter()
            sessions[n].run(None, feeds)
            times[n].append((time.perf_counter() - t) * 1000.0)
    return times
