"""`compress inspect`: what a model folder or an artifact holds."""

from __future__ import annotations

from pathlib import Path

from compressor.runtime.artifact import MANIFEST, read_manifest


def inspect_path(spec: str) -> dict:
    path = Path(spec)
    if path.is_dir() and (path / MANIFEST).exists():
        m = read_manifest(path, verify=True)
        return {
            "kind": "artifact",
            "source": m["source"]["spec"],
            "model": m["model"],
            "inputs": m["inputs"],
            "outputs": m["outputs"],
            "passes": [{"name": p["name"], "options": p["options"], "seconds": p["seconds"]} for p in m["passes"]],
            "token_counts": m["token_plan"]["token_counts"],
            "flops": m["flops"],
            "params": m["params"],
            "validation": {k: v for k, v in m["validation"].items() if k != "thresholds"},
            "files": len(m["files"]),
            "kv_cache": kv_cache_info(m),
        }
    from compressor.program.capture import capture, graph_stats
    from compressor.program.handle import load

    handle = load(spec)
    stats = graph_stats(capture(handle.program(dense=True), handle.example_inputs()))
    return {
        "kind": "model",
        "source": spec,
        "folder": handle.source.folder,
        "model": handle.adapter.describe(),
        "shapes": handle.shapes,
        "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in handle.input_specs()],
        "flops": stats.flops,
        "params": stats.params,
        "token_counts": handle.plan.token_counts(handle.num_tokens, handle.num_layers),
    }


def kv_cache_info(m: dict) -> dict | None:
    """A language model's KV cache as the runtime keeps it: the compiled policy and budget, or the full cache up to
    the artifact's context (None for other kinds)."""
    pre = m.get("preprocess", {})
    if pre.get("kind") != "causal_lm":
        return None
    info = {"max_length": pre.get("max_length"), "policy": "full"}
    policy = pre.get("kv_policy")
    if policy:
        budget = policy["budget"]
        info.update(policy=policy["policy"], sinks=policy["sinks"], prefill=policy["prefill"],
                    budget=budget if isinstance(budget, int) else f"{budget['fraction']:.0%} of the prompt")
        if policy["policy"] != "window":  # (the runtime's defaults: H2O's even split, SnapKV's 32-token window)
            recent = policy["recent"]
            info["recent"] = recent if recent is not None else "half the budget" if policy["policy"] == "h2o" else 32
    return info
