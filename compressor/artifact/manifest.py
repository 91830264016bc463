"""The manifest: what an artifact holds and how it was built (source, passes, shapes, FLOPs, validation, recipe,
versions); the kind-specific fields (outputs, export record) come from the target."""

from __future__ import annotations

import datetime as _dt

from compressor.artifact.publish import versions
from compressor.lower.onnx import MODEL_FILE, OPSET
from compressor.runtime.artifact import FORMAT_NAME, FORMAT_VERSION


def build_manifest(handle, dense, stats, validation_result: dict, recipe: dict | None) -> dict:
    specs = handle.input_specs()
    outputs = handle.target.outputs(handle)
    model = handle.adapter.describe()
    model["params"] = stats.params  # counted as params.compressed is (weights and constants the graph reads)
    inputs = [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in specs]
    preprocess = handle.adapter.preprocess_config(handle.shapes)
    if handle.kv_policy:  # the fused graph's rotary positions come from the runtime (passes/kv_cache.py)
        inputs.insert(2, {"name": "position_ids", "shape": ["batch", "sequence"], "dtype": "int64"})
        preprocess["kv_policy"] = dict(handle.kv_policy)
    return {
        "format": {"name": FORMAT_NAME, "version": FORMAT_VERSION},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": handle.source.to_json(),
        "model": model,
        "model_file": MODEL_FILE,
        "opset": OPSET,
        "shapes": handle.shapes,
        "inputs": inputs,
        "outputs": outputs,
        "preprocess": preprocess,
        "passes": handle.history,
        "token_plan": {
            "merges": handle.plan.merges or [0] * handle.num_layers,
            "proportional_attention": handle.plan.proportional_attention,
            **handle.plan.describe(),
            "token_counts": handle.plan.token_counts(handle.num_tokens, handle.num_layers),
        },
        "flops": {"dense": dense.flops, "compressed": stats.flops, "ratio": dense.flops / max(stats.flops, 1)},
        "params": {"dense": dense.params, "compressed": stats.params},
        "validation": validation_result,
        "recipe": recipe,
        "versions": versions(),
    }
