"""Structured pruning on SmolLM2-135M: quality versus parameters for every layer_prune metric, width_prune importance
and compensation, and SliceGPT at the same parameters, with baselines that remove by position (deepest blocks) and
by weight magnitude; optionally the onnxruntime speed of each artifact against the dense export (one run each).

    python benchmarks/pruning.py --out benchmarks/pruning_smollm2.json [--windows 16] [--speed] [--only NAME,...]

Rows of an earlier run with the same number of windows are kept; a variant run again replaces its row.

Perplexity: held-out 512-token windows of the Wikipedia extract (the last 20% of the articles; calibration reads only
the first 80%), PyTorch program, as in benchmarks/slicegpt_protocol.py. Speed (--speed): `compress bench` of the
compiled artifact (prefill 1 x 512, 64 decode steps, 2 threads, dense and compressed interleaved in one run).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from compressor.program.handle import load
from compressor.sources.lm_data import held_out_windows, torch_perplexity
from compressor.pipeline.registry import make_pass
from compressor.pipeline.pass_manager import Pipeline
from compressor.validation.lm import program_logits

CAL = {"calibration_samples": 32, "calibration_len": 256}
VARIANTS = {
    0.85: [
        ("layer_prune depth (baseline)", [("layer_prune", {"params": 0.85, "metric": "depth"})]),
        ("layer_prune block_influence", [("layer_prune", {"params": 0.85, "metric": "block_influence", **CAL})]),
        ("layer_prune angular", [("layer_prune", {"params": 0.85, "metric": "angular", **CAL})]),
        ("layer_prune greedy", [("layer_prune", {"params": 0.85, "metric": "greedy", "calibration_samples": 8, "calibration_len": 256})]),
        ("width_prune magnitude, none (baseline)", [("width_prune", {"params": 0.85, "importance": "magnitude", "compensate": "none", **CAL})]),
        ("width_prune activation, none", [("width_prune", {"params": 0.85, "importance": "activation", "compensate": "none", **CAL})]),
        ("width_prune activation, bias", [("width_prune", {"params": 0.85, "importance": "activation", "compensate": "bias", **CAL})]),
        ("width_prune activation, least_squares", [("width_prune", {"params": 0.85, "importance": "activation", "compensate": "least_squares", **CAL})]),
        ("width_prune fisher, least_squares", [("width_prune", {"params": 0.85, "importance": "fisher", "compensate": "least_squares", **CAL})]),
        ("slicegpt portable 15%, tied head", [("slicegpt", {"sparsity": 0.15, "tie_head": True, "normalize_tokens": True})]),
    ],
    0.75: [
        ("layer_prune block_influence", [("layer_prune", {"params": 0.75, "metric": "block_influence", **CAL})]),
        ("layer_prune angular", [("layer_prune", {"params": 0.75, "metric": "angular", **CAL})]),
        ("width_prune activation, least_squares", [("width_prune", {"params": 0.75, "importance": "activation", "compensate": "least_squares", **CAL})]),
        ("width_prune fisher, least_squares", [("width_prune", {"params": 0.75, "importance": "fisher", "compensate": "least_squares", **CAL})]),
        ("slicegpt portable 25%, tied head", [("slicegpt", {"sparsity": 0.25, "tie_head": True, "normalize_tokens": True})]),
    ],
}


def run_variant(passes, windows) -> dict:
    handle = load("example:smollm2")
    start = time.perf_counter()
    Pipeline([make_pass(name, dict(opts)) for name, opts in passes]).run(handle)
    seconds = time.perf_counter() - start
    first, last = handle.history[0], handle.history[-1]
    ppl = torch_perplexity(program_logits(handle.program(), handle.adapter), windows)
    return {"handle": handle, "row": {
        "params_ratio": last["params_after"] / first["params_before"], "flops_ratio": last["flops_after"] / first["flops_before"],
        "perplexity": ppl, "prune_seconds": round(seconds, 1),
        "layers": handle.num_layers, "transformers_loadable": handle.adapter.transformers_loadable,
        "passes": [{"name": r["name"], "options": r["options"], "info": {k: v for k, v in r["info"].items()
                                                                         if k in ("removed_blocks", "heads_per_layer", "channels_per_layer", "kv_heads_per_layer", "width_after")}}
                   for r in handle.history]}}


def speed(handle, workdir: Path) -> dict:
    from compressor.measure.bench import bench_artifact
    from compressor.artifact.compile import compile_artifact

    out = workdir / f"a{time.time_ns()}"
    compile_artifact(handle, out, {"perplexity_windows": 2, "max_perplexity_ratio": 1e6, "greedy_prompts": 1, "min_greedy_agreement": 0.0})
    return bench_artifact(out, repeats=5, warmup=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/pruning_smollm2.json")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--speed", action="store_true", help="compile each variant and time it against the dense export")
    ap.add_argument("--only", default="", help="comma-separated substrings of variant names to run")
    ap.add_argument("--targets", default="0.85,0.75", help="comma-separated parameter fractions to run")
    args = ap.parse_args()
    dense = load("example:smollm2")
    windows = held_out_windows(dense.adapter.tokenizer_file, 512, args.windows)
    base = torch_perplexity(program_logits(dense.program(), dense.adapter), windows)
    result = {"model": "SmolLM2-135M-Instruct", "windows": len(windows), "window_len": 512, "dense_perplexity": base, "rows": []}
    earlier = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    if earlier.get("windows") == len(windows):  # same protocol: keep the rows this run does not redo
        result["rows"] = earlier.get("rows", [])
    print(f"dense perplexity {base:.2f} on {len(windows)} x 512 held-out tokens", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for target, variants in VARIANTS.items():
            if target not in [float(t) for t in args.targets.split(",")]:
                continue
            for name, passes in variants:
                if args.only and not any(s in name for s in args.only.split(",")):
                    continue
                got = run_variant(passes, windows)
                row = {"variant": name, "target_params": target, **got["row"], "perplexity_ratio": got["row"]["perplexity"] / base}
                if args.speed:
                    row["speed"] = speed(got["handle"], Path(tmp))
                result["rows"] = [r for r in result["rows"] if (r["variant"], r["target_params"]) != (name, target)] + [row]
                print(f"{name:45s} params {row['params_ratio']:.3f}  ppl {row['perplexity']:8.2f} ({row['perplexity_ratio']:.2f}x)"
                      f"  {row['prune_seconds']:6.1f} s" + (f"  speed {row['speed']}" if args.speed else ""), flush=True)
                Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
