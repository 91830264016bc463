"""Length buckets for text artifacts: shorter static graphs beside the compiled seq_len, with the same weights.

A static graph pads every text to seq_len, so a 29-token sentence pays for 128 tokens. With `buckets = [32, 64]` the
artifact also ships model.s32.onnx and model.s64.onnx; the runtime puts each text in the smallest graph that holds it.
Each bucket removes, by every layer, only the real tokens the compiled graph would remove from a text of that length
(the compiled graph spends its plan on padding first: bucket_plan), goes through the same fusions / INT8, and is
validated on its own.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from compressor.lower.optimize import deploy_graph, lowered_path
from compressor.validation.encoder import validate
from compressor.program.encoder import TokenPlan
from compressor.program.merging import max_merge
from compressor.program.pruning import max_prune


def bucket_file(seq_len: int) -> str:
    return f"model.s{seq_len}.onnx"


def bucket_plan(plan: TokenPlan, seq_len: int, bucket: int, layers: int, protected: int) -> TokenPlan:
    """The plan at `bucket` tokens, padding first. In the compiled graph a text of `bucket` real tokens carries
    seq_len - bucket padding tokens, and the plan removes those first (masked, alike); so by each layer the bucket
    graph removes only what the compiled graph removes beyond that padding (drops before merges, as the plan orders
    them, never more than the matching allows). A text never loses more real tokens in its bucket than in the
    compiled graph: the bucket is as faithful and runs fewer tokens."""
    padding, n, planned, done = seq_len - bucket, bucket, 0, 0
    prunes, merges = [], []
    for i in range(layers):
        planned += plan.prunes_at(i) + plan.merges_at(i)
        want = max(0, planned - padding) - done
        p = min(want, plan.prunes_at(i), max_prune(n, protected))
        n -= p
        m = min(want - p, max_merge(n, protected))
        n -= m
        done += p + m
        prunes.append(p)
        merges.append(m)
    return dataclasses.replace(plan, merges=merges if any(merges) else [], prunes=prunes if any(prunes) else [])


def bucket_handle(handle, bucket: int):
    """The same model (adapter and weights shared) at seq_len = bucket with the scaled plan; call
    adapter.prepare(its shapes) before capturing it and adapter.prepare(handle.shapes) after."""
    plan = bucket_plan(handle.plan, handle.shapes["seq_len"], bucket, handle.num_layers,
                       handle.adapter.protected_per_sample)
    return dataclasses.replace(handle, shapes={**handle.shapes, "seq_len": bucket}, plan=plan, probe_inputs=None)


def compile_buckets(handle, original, tmp: Path, options, cfg, source, result: dict, step) -> list[dict]:
    """Export, deploy and validate one graph per bucket into tmp; returns the manifest's export.buckets (every
    graph, shortest first, the compiled seq_len last) and records each bucket's validation in `result` (the main
    validation), whose `passed` then covers them all."""
    from compressor.runtime.model import make_session

    from compressor.lower.onnx import MODEL_FILE, export_onnx

    entries, summary = [], []
    try:
        for bucket in options.buckets:
            small = bucket_handle(handle, bucket)
            handle.adapter.prepare(small.shapes)
            original.adapter.prepare(small.shapes)
            name = bucket_file(bucket)
            step(f"bucket {bucket}: capturing and lowering to ONNX")
            stats = export_onnx(small, tmp, file_name=name)
            record, lowered = deploy_graph(tmp / name, options, handle.adapter, step)
            step(f"bucket {bucket}: validating on held-out inputs")
            checked = validate(small, make_session(tmp / name), cfg, source, original.program(dense=True),
                               make_session(lowered) if lowered else None)
            lowered_path(tmp / name).unlink(missing_ok=True)
            checked["data"] += f", cut to {bucket} tokens"
            entries.append({"seq_len": bucket, "model_file": name,
                            "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in small.input_specs()],
                            "token_plan": {"merges": small.plan.merges or [0] * small.num_layers,
                                           "prunes": small.plan.prunes or [0] * small.num_layers,
                                           "token_counts": small.plan.token_counts(bucket, small.num_layers)},
                            "flops": {"compressed": stats.flops}, "steps": record["steps"], "validation": checked})
            summary.append({"seq_len": bucket, "passed": checked["passed"],
                            "cosine_to_dense_mean": checked["cosine_to_dense_mean"],
                            "cosine_to_dense_p5": checked["cosine_to_dense_p5"]})
            result["failures"] += [f"bucket {bucket}: {f}" for f in checked["failures"]]
    finally:
        handle.adapter.prepare(handle.shapes)
        original.adapter.prepare(original.shapes)
    seq_len = handle.shapes["seq_len"]
    entries.append({"seq_len": seq_len, "model_file": MODEL_FILE, "validation": "the top-level validation"})
    result["buckets"] = summary
    result["passed"] = not result["failures"]
    return entries
