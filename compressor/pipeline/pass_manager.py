"""The pass manager: runs passes in order, checks the model after each, times each and records the history.

Before the first pass the list's ordering rules are checked (`check_order`); each pass is checked against the model
(`Pass.check`: what it requires), runs with the pass context (`run(handle, ctx)`: calibration data, the reference
model, latency measurement, progress), and must leave what it ensures (`check_ensures`), a static graph with the same
output shape and finite outputs on the probe batch. Instruments (after TVM's pass instruments) see every pass before
and after it runs: the CLI uses one to show progress. Every record goes into the artifact's manifest so a build can be
replayed.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from compressor.program.capture import capture, graph_stats
from compressor.errors import CompressorError
from compressor.pipeline.context import PassContext
from compressor.pipeline.pass_base import Pass, check_ensures, check_order, measure_ensures


class PassInstrument(Protocol):
    def before_pass(self, p: Pass, index: int, total: int) -> None: ...
    def after_pass(self, p: Pass, record: dict) -> None: ...


def probe(handle) -> torch.Tensor:
    """The model's main output on the probe batch (logits for language models)."""
    with torch.no_grad():
        out = handle.program()(*handle.example_inputs())
    return out[0] if isinstance(out, tuple) else out


def check_probe(name: str, out: torch.Tensor, previous: torch.Tensor) -> dict:
    """Shapes and finiteness must hold; fidelity to the previous step is measured and recorded."""
    if out.shape != previous.shape:
        raise CompressorError(f"after pass '{name}' the output shape changed from {tuple(previous.shape)} to {tuple(out.shape)}")
    if not torch.isfinite(out).all():
        raise CompressorError(f"after pass '{name}' the model produces non-finite outputs on the probe batch")
    cos = torch.nn.functional.cosine_similarity(out.double(), previous.double(), dim=-1)
    return {"cosine_to_previous_mean": float(cos.mean()), "cosine_to_previous_min": float(cos.min())}


class Pipeline:
    def __init__(self, passes: list[Pass], instruments: list[PassInstrument] | None = None):
        self.passes = list(passes)
        self.instruments = list(instruments or [])

    def run(self, handle, ctx: PassContext | None = None):
        """Run the passes on `handle` (changed in place, and returned) with `ctx`, by default
        `PassContext.for_handle(handle)`."""
        check_order(self.passes)
        if ctx is None:
            ctx = PassContext.for_handle(handle)
        example = handle.example_inputs()
        stats = graph_stats(capture(handle.program(), example))
        if handle.baseline is None and not handle.history:
            dense_now = not handle.plan.active  # then program() is the dense program: no second capture
            handle.baseline = stats if dense_now else graph_stats(capture(handle.program(dense=True), example))
        previous = probe(handle)
        for i, p in enumerate(self.passes):
            p.check(handle)
            for ins in self.instruments:
                ins.before_pass(p, i, len(self.passes))
            before = measure_ensures(p, handle)
            start = time.perf_counter()
            result = p.run(handle, ctx)
            seconds = time.perf_counter() - start
            check_ensures(p, handle, before)
            after = graph_stats(capture(handle.program(), handle.example_inputs()))
            if not after.static:
                raise CompressorError(f"after pass '{p.name}' the captured graph has dynamic shapes")
            out = probe(handle)
            record = {
                "name": p.name,
                "options": p.options(),
                "seconds": round(seconds, 4),
                "modified": result.modified,
                "flops_before": stats.flops, "flops_after": after.flops,
                "params_before": stats.params, "params_after": after.params,
                "probe": check_probe(p.name, out, previous),
                "info": result.info,
            }
            handle.history.append(record)
            for ins in self.instruments:
                ins.after_pass(p, record)
            stats, previous = after, out
        return handle
