"""Deployment benchmark: our artifacts against what a user would run instead, on stated length distributions.

Rows: dense static (same shapes as the artifact), dense dynamic (batched by length), dense fused (optimum-style
export + onnxruntime's transformer optimizer), dense fused INT8, and our artifacts with and without INT8. MiniLM on
three text distributions (short Lee background sentences, Lee documents, Wikipedia passages filling 128 tokens) with
Lee-corpus correlation as quality; DINOv2-S on Fashion-MNIST test images with CLS cosine to dense.

All rows of a distribution are timed interleaved in one run, so the ratios hold even on a loaded machine; the JSON
states the load average. Run: python benchmarks/deploy.py [--only minilm|dinov2] [--out benchmarks/deploy.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from compressor.measure.baseline_bench import baseline_sessions, length_distributions, time_distribution  # noqa: E402
from compressor.validation.encoder import cosine_rows  # noqa: E402
from compressor.pipeline.build import run_recipe  # noqa: E402
from compressor.pipeline.recipe import load_recipe  # noqa: E402
from compressor.runtime.artifact import read_manifest  # noqa: E402
from compressor.runtime.model import make_session, run_in_batches  # noqa: E402
from compressor.sources import data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2
LOOSE = {"min_cosine_mean": 0.0, "min_cosine_p5": 0.0, "min_agreement": 0.0}  # measured here, not gated

# name -> (recipe file, [export] deployment keys, gate on the recipe's own validation thresholds)
VARIANTS = {
    "minilm": {
        "tome": ("examples/minilm-tome.toml", {}, False),
        "tome int8": ("examples/minilm-tome.toml", {"quantize": "int8-dynamic"}, False),
        "prune+tome": ("examples/minilm-prune-tome.toml", {}, False),
        "deploy fp32 (prune+tome, fused)": ("examples/minilm-deploy.toml", {"fuse": True}, True),
        "deploy (prune+tome, fused, int8)": ("examples/minilm-deploy.toml", None, True),
    },
    "dinov2": {
        "tome": ("examples/dinov2-tome.toml", {}, False),
        "tome int8": ("examples/dinov2-tome.toml", {"quantize": "int8-dynamic"}, False),
        "prune+tome": ("examples/dinov2-prune-tome.toml", {}, False),
        "deploy (prune+tome, int8)": ("examples/dinov2-deploy.toml", None, True),
    },
}


def build(name: str, file: str, deploy: dict | None, gated: bool, workdir: Path, reuse: bool) -> Path:
    out = workdir / name.split(" (")[0].replace(" ", "-").replace("+", "-")
    if reuse and (out / "manifest.json").exists():
        return out
    recipe = load_recipe(ROOT / file)
    if deploy is not None:
        recipe.deploy = dict(deploy)
    if not gated:
        recipe.validation.update(LOOSE)
    t = time.perf_counter()
    run_recipe(recipe, out, force=True)
    print(f"  built {name} in {time.perf_counter() - t:.0f} s", flush=True)
    return out


def embed(session, feeds: dict, batch: int) -> np.ndarray:
    names = {i.name for i in session.get_inputs()}
    return run_in_batches(lambda chunk: session.run(None, {k: v for k, v in chunk.items() if k in names})[0], feeds, batch)


def quality(model: str, artifact: Path, manifest: dict, sessions: dict) -> dict:
    """MiniLM: Lee corpus correlation (50 documents vs human judgements) and cosine to dense on the Lee documents;
    DINOv2: CLS cosine to dense on 64 Fashion-MNIST test images (after the 32 the compile validated on)."""
    from compressor.measure.baseline_bench import _preprocess

    b = manifest["shapes"]["batch"]
    if model == "minilm":
        feeds = _preprocess(artifact, manifest, data.lee_documents())
        human, iu = data.lee_human_similarities(), np.triu_indices(50, k=1)
    else:
        images, _ = data.fashion_mnist("test")
        feeds = _preprocess(artifact, manifest, [images[i] for i in range(32, 96)])
    out = {n: embed(s, feeds, b) for n, s in sessions.items()}
    result = {}
    for n, e in out.items():
        row = {"cosine_to_dense_mean": float(cosine_rows(e, out["dense static"]).mean()),
               "cosine_to_dense_p5": float(np.percentile(cosine_rows(e, out["dense static"]), 5))}
        if model == "minilm":
            unit = e / np.linalg.norm(e, axis=1, keepdims=True)
            sims = unit @ unit.T
            row["lee_pearson"] = float(np.corrcoef(sims[iu], human[iu])[0, 1])
        result[n] = row
    return result


def bench_model(model: str, workdir: Path, repeats: int, warmup: int, samples: int, reuse: bool, skip=()) -> dict:
    print(f"{model}: building artifacts", flush=True)
    artifacts = {n: build(n, *v, workdir / model, reuse) for n, v in VARIANTS[model].items() if n not in skip}
    first = next(iter(artifacts.values()))
    manifest = read_manifest(first)
    open_session = lambda p: make_session(p, threads=THREADS)  # noqa: E731
    base, about = baseline_sessions(manifest, open_session)
    labels = {"static": "dense static", "dynamic": "dense dynamic", "fused": "dense fused", "fused_int8": "dense fused int8"}
    sessions = {labels[k]: s for k, s in base.items()}
    manifests = {n: read_manifest(a) for n, a in artifacts.items()}
    sessions.update({n: open_session(a / manifests[n]["model_file"]) for n, a in artifacts.items()})
    print(f"{model}: quality", flush=True)
    q = quality(model, first, manifest, sessions)
    timing_names = {"dense static": "static", "dense dynamic": "dynamic", "dense fused": "fused", "dense fused int8": "fused_int8"}
    distributions = {}
    for dist, (what, raw) in length_distributions(manifest, samples).items():
        print(f"{model}: timing '{dist}' ({len(raw)} samples, {repeats} interleaved runs)", flush=True)
        keyed = {timing_names.get(n, n): s for n, s in sessions.items()}  # the batching follows the key
        row = time_distribution(first, manifest, raw, keyed, repeats, warmup)
        ms = {n: row["ms"][timing_names.get(n, n)] for n in sessions}
        fused = ms["dense fused"]
        distributions[dist] = {
            "data": what, "samples": len(raw),
            **{k: v for k, v in row.items() if k not in ("ms", "cosine_to_dense")},
            "ms": ms, "speedup_vs_dense_fused": {n: fused / t for n, t in ms.items()},
            "speedup_vs_dense_static": {n: ms["dense static"] / t for n, t in ms.items()},
        }
    return {
        "shapes": manifest["shapes"], "threads": THREADS, "repeats": repeats,
        "artifacts": {n: {"recipe": VARIANTS[model][n][0], "export": m.get("export", {}), "flops_ratio": m["flops"]["ratio"],
                          "params": m["params"]["compressed"], "validation": {k: m["validation"].get(k) for k in (
                              "cosine_to_dense_mean", "cosine_to_dense_p5", "onnx_vs_torch_agreement",
                              "real_tokens_merged_fraction", "cosine_to_unquantized_mean", "passed")}}
                      for n, m in manifests.items()},
        "baselines": about, "quality": q, "distributions": distributions,
    }


def print_table(model: str, result: dict) -> None:
    dists = list(result["distributions"])
    head = ["row"] + [f"{d} x fused" for d in dists] + ["cos"] + (["lee r"] if model == "minilm" else [])
    print(f"\n{model} {result['shapes']} (speed-up over dense fused FP32; one interleaved run per distribution)")
    for d in dists:
        x = result["distributions"][d]
        if "real_tokens_mean" in x:
            print(f"  {d}: {x['data']}, real tokens mean {x['real_tokens_mean']:.0f}, max {x['real_tokens_max']}")
    print(" | ".join(head))
    for n in result["quality"]:
        cells = [n] + [f"{result['distributions'][d]['speedup_vs_dense_fused'][n]:.2f}" for d in dists]
        qn = result["quality"][n]
        cells.append(f"{qn['cosine_to_dense_mean']:.3f}")
        if model == "minilm":
            cells.append(f"{qn['lee_pearson']:.3f}")
        print(" | ".join(cells))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=sorted(VARIANTS), action="append")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--samples", type=int, default=32, help="texts/images per distribution (whole batches)")
    ap.add_argument("--workdir", default=str(ROOT / "out" / "deploy"))
    ap.add_argument("--reuse", action="store_true", help="reuse artifacts already built in --workdir")
    ap.add_argument("--skip", action="append", default=[], help="leave out an artifact row (its name, as printed)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "deploy.json"))
    args = ap.parse_args()
    results = {"load_average_start": list(os.getloadavg()), "cpu_count": os.cpu_count()}
    for model in args.only or list(VARIANTS):
        results[model] = bench_model(model, Path(args.workdir), args.repeats, args.warmup, args.samples, args.reuse, args.skip)
        print_table(model, results[model])
    results["load_average_end"] = list(os.getloadavg())
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
