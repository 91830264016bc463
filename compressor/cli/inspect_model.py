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
