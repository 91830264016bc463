"""Dense vs token-merged, both examples, on CPU onnxruntime (2 threads), real data, one run per example.

    python benchmarks/run.py --out benchmarks/results.json [--only minilm|dinov2] [--repeats 15]
    python benchmarks/run.py --only dinov2-slicing --out benchmarks/dinov2_slicing.json
    python benchmarks/run.py --only minilm-pruning --out benchmarks/minilm_pruning.json   (and dinov2-pruning)
    python benchmarks/run.py --only token-reduction --out benchmarks/token_reduction.json
    python benchmarks/run.py --only pruning-targets --out benchmarks/pruning_targets.json

Rows: PyTorch eager dense, onnxruntime dense, onnxruntime compressed at several r. Columns: latency (median of
interleaved runs), speed-up vs onnxruntime dense, FLOPs ratio (dense/compressed, counted on the captured graphs),
efficiency (speed-up / FLOPs ratio) and quality:
- MiniLM (batch 16 x 128, real sentences padded): cosine of pooled embeddings to dense on held-out sentences, and
  Pearson correlation with human judgements on the Lee corpus (50 documents, upper triangle of the 50x50 matrix).
- DINOv2 (batch 8 x 224 x 224): CLS cosine to dense, and linear-probe accuracy on Fashion-MNIST (1000 train / 500
  test images; a probe trained on each model's own features).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from compressor.sources import data  # noqa: E402
from compressor.measure.timing import time_interleaved  # noqa: E402
from compressor.lower.onnx import export_onnx  # noqa: E402
from compressor.program.handle import load  # noqa: E402
from compressor.sources.inputs import feed_batches, preprocessor  # noqa: E402
from compressor.pipeline.pass_manager import Pipeline  # noqa: E402
from compressor.pipeline.registry import make_pass  # noqa: E402
from compressor.program.capture import capture, graph_stats  # noqa: E402
from compressor.runtime.model import make_session, run_in_batches  # noqa: E402
from compressor.validation.encoder import cosine_rows  # noqa: E402

THREADS = 2


class Eager:
    """PyTorch eager, with the same .run(None, feeds) call as an onnxruntime session."""

    def __init__(self, module, names):
        self.module, self.names = module, names

    def run(self, _outputs, feeds):
        with torch.inference_mode():
            return [self.module(*(torch.from_numpy(feeds[n]) for n in self.names)).numpy()]


def embed_all(session, feeds: dict, batch: int) -> np.ndarray:
    """Run any number of samples through a static-batch session, padding the last batch."""
    return run_in_batches(lambda chunk: session.run(None, chunk)[0], feeds, batch)


def build_variants(source: str, shapes: dict, settings: list, workdir: Path):
    """Export dense and one compressed ONNX per setting; returns rows with sessions and graph FLOPs."""
    rows = []
    handle = load(source, **shapes)
    names = [s.name for s in handle.input_specs()]
    dense_dir = workdir / "dense"
    dense_dir.mkdir()
    stats = export_onnx(handle, dense_dir, dense=True)
    rows.append({"name": "onnxruntime dense", "setting": None, "flops": stats.flops, "params": stats.params, "path": dense_dir / "model.onnx"})
    eager = Eager(handle.program(dense=True), names)
    for i, setting in enumerate(settings):
        h = load(source, **shapes)
        passes = setting if isinstance(setting, list) else [("token_merge", setting)]
        Pipeline([make_pass(name, dict(opts)) for name, opts in passes]).run(h)
        d = workdir / f"variant{i}"
        d.mkdir()
        st = export_onnx(h, d)
        label = " + ".join(f"{name} {opts}" for name, opts in passes)
        rows.append({"name": f"onnxruntime {label}", "setting": passes, "flops": st.flops, "params": st.params,
                     "path": d / "model.onnx", "schedule": h.plan.merges, "prunes": h.plan.prunes,
                     "token_counts": h.plan.token_counts(h.num_tokens, h.num_layers)})
    for r in rows:
        r["session"] = make_session(r["path"], threads=THREADS)
    return handle, eager, rows


def time_rows(eager, rows, feeds, repeats):
    sessions = {"pytorch eager dense": eager, **{r["name"]: r["session"] for r in rows}}
    times = time_interleaved(sessions, feeds, repeats, warmup=2)
    return {k: float(np.median(v)) for k, v in times.items()}


def finish(rows, latency, dense_flops, eager_flops_name="pytorch eager dense"):
    base = latency["onnxruntime dense"]
    table = [{"name": eager_flops_name, "latency_ms": latency[eager_flops_name], "speedup": base / latency[eager_flops_name],
              "flops_ratio": 1.0, "efficiency": None}]
    for r in rows:
        sp = base / latency[r["name"]]
        fr = dense_flops / r["flops"]
        table.append({"name": r["name"], "setting": r["setting"], "schedule": r.get("schedule"), "params": r.get("params"),
                      "token_counts": r.get("token_counts"), "latency_ms": latency[r["name"]], "speedup": sp,
                      "flops": r["flops"], "flops_ratio": fr, "efficiency": sp / fr, **r.get("quality", {})})
    return table


def width(flops: float, importance: str = "activation", compensate: str = "least_squares", **more) -> tuple:
    return ("width_prune", {"flops": flops, "importance": importance, "compensate": compensate, **more})


def bench_minilm(repeats: int, workdir: Path) -> dict:
    settings = [{"r": 8}, {"r": 12}, {"r": 16}, {"r": 20},
                {"reduction": 0.36, "decay": 0.5, "proportional_attention": False}]  # the example recipe
    return _bench_minilm(settings, repeats, workdir)


def bench_minilm_pruning(repeats: int, workdir: Path) -> dict:
    """width_prune at several FLOPs budgets, each importance metric and compensation, layer_prune, and pruning
    combined with token merging (the example recipe's merging on the pruned model)."""
    merge = ("token_merge", {"reduction": 0.36, "decay": 0.5, "proportional_attention": False})
    return _bench_minilm([
        [width(0.8)], [width(0.7)], [width(0.6)],
        [width(0.6, compensate="none")], [width(0.6, compensate="bias")],
        [width(0.6, importance="fisher")], [width(0.6, importance="magnitude", compensate="none")],
        [("layer_prune", {"blocks": 1})], [("layer_prune", {"blocks": 1, "metric": "greedy"})],
        [width(0.8), merge], [width(0.9), merge],
    ], repeats, workdir)


def bench_pruning_targets(repeats: int, workdir: Path) -> dict:
    """The structured-pruning targets in FP32 (no fusions, no INT8), against the dense export at the same shapes:
    pruning + merging aimed at 2.0x, with widths chosen by FLOPs or by a measured latency budget."""
    def lat(keep: float, **more) -> tuple:
        return ("width_prune", {"latency": keep, "importance": "activation", "compensate": "least_squares", **more})
    merge_text = ("token_merge", {"reduction": 0.36, "decay": 0.5, "proportional_attention": False})
    for sub in ("minilm", "dinov2"):
        (workdir / sub).mkdir()
    minilm = _bench_minilm([[lat(0.7)], [width(0.7)], [lat(0.7), merge_text], [width(0.7), merge_text],
                            [width(0.6), merge_text]], repeats, workdir / "minilm")
    dinov2 = _bench_dinov2([[lat(0.7, uniform=True)], [width(0.8, uniform=True), ("token_merge", {"r": 12})],
                            [width(0.8, uniform=True), ("token_merge", {"r": 16})],
                            [width(0.7, uniform=True), ("token_merge", {"r": 12})],
                            [lat(0.7, uniform=True), ("token_merge", {"r": 12})]], repeats, workdir / "dinov2")
    return {"example": "minilm-small + dinov2-small", "shapes": {}, "minilm": minilm, "dinov2": dinov2,
            "rows": [{**r, "name": f"minilm {r['name']}"} for r in minilm["rows"]] + [{**r, "name": f"dinov2 {r['name']}"} for r in dinov2["rows"]]}


def _bench_minilm(settings: list, repeats: int, workdir: Path) -> dict:
    shapes = {"batch": 16, "seq_len": 128}
    handle, eager, rows = build_variants("example:minilm", shapes, settings, workdir)
    pre = preprocessor(handle)
    timing_batch = feed_batches(handle, "validation", 16)[0]
    held_out = pre(data.text_split("validation", 256))
    lee = pre(data.lee_documents())
    human = data.lee_human_similarities()
    iu = np.triu_indices(50, k=1)
    dense_emb = embed_all(rows[0]["session"], held_out, 16)
    for r in rows:
        emb = embed_all(r["session"], held_out, 16)
        lee_emb = embed_all(r["session"], lee, 16)
        sims = lee_emb @ lee_emb.T / np.outer(np.linalg.norm(lee_emb, axis=1), np.linalg.norm(lee_emb, axis=1))
        cos = cosine_rows(emb, dense_emb)
        r["quality"] = {"cosine_to_dense_mean": float(cos.mean()), "cosine_to_dense_p5": float(np.percentile(cos, 5)),
                        "lee_pearson": float(np.corrcoef(sims[iu], human[iu])[0, 1])}
    latency = time_rows(eager, rows, timing_batch, repeats)
    table = finish(rows, latency, rows[0]["flops"])
    real = int(timing_batch["attention_mask"].sum())
    return {"example": "minilm", "shapes": shapes, "timing_batch_real_tokens": real, "timing_batch_tokens": 16 * 128,
            "rows": table}


def linear_probe(train_x, train_y, test_x, test_y, grid=(1e-4, 1e-3, 1e-2, 1e-1)) -> float:
    """Logistic-regression probe; its L2 strength is chosen by 5-fold cross-validation on the training split only."""
    return float((probe_classifier(train_x, train_y, grid)(test_x) == test_y).mean())


def probe_classifier(train_x, train_y, grid=(1e-4, 1e-3, 1e-2, 1e-1)):
    """The trained probe (L2 by 5-fold cross-validation on the training split) as features -> predicted labels."""
    folds = np.arange(len(train_x)) % 5
    best = max(grid, key=lambda l2: np.mean([
        _probe(train_x[folds != k], train_y[folds != k], train_x[folds == k], train_y[folds == k], l2) for k in range(5)]))
    return _fit_probe(train_x, train_y, best)


def _probe(train_x, train_y, test_x, test_y, l2: float) -> float:
    return float((_fit_probe(train_x, train_y, l2)(test_x) == test_y).mean())


def _fit_probe(train_x, train_y, l2: float):
    """Multinomial logistic regression on standardised features (L-BFGS), as features -> predicted labels."""
    from scipy.optimize import minimize

    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    xtr = np.hstack([(train_x - mu) / sd, np.ones((len(train_x), 1))])
    k, d = 10, xtr.shape[1]
    onehot = np.eye(k)[train_y]

    def loss(w):
        w = w.reshape(d, k)
        z = xtr @ w
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        value = -np.log(p[np.arange(len(p)), train_y] + 1e-12).mean() + l2 * (w[:-1] ** 2).sum()
        grad = xtr.T @ (p - onehot) / len(p)
        grad[:-1] += 2 * l2 * w[:-1]
        return value, grad.ravel()

    w = minimize(loss, np.zeros(d * k), jac=True, method="L-BFGS-B", options={"maxiter": 500}).x.reshape(d, k)
    return lambda x: (np.hstack([(x - mu) / sd, np.ones((len(x), 1))]) @ w).argmax(1)


SLICE25 = {"sparsity": 0.25, "calibration_samples": 64, "normalize_tokens": True}


def bench_dinov2(repeats: int, workdir: Path) -> dict:
    slice25 = ("slicegpt", SLICE25)
    return _bench_dinov2([{"r": 12}, {"r": 16}, {"reduction": 0.42}, {"reduction": 0.42, "decay": 0.9}, {"r": 22},
                          [slice25], [slice25, ("token_merge", {"r": 12})]], repeats, workdir)


def bench_dinov2_pruning(repeats: int, workdir: Path) -> dict:
    """width_prune (uniform widths: a stock model) and layer_prune on DINOv2, alone and with token merging."""
    merge = ("token_merge", {"r": 12})
    return _bench_dinov2([
        [width(0.8, uniform=True)], [width(0.7)], [width(0.7, importance="fisher", compensate="none")],
        [width(0.7, importance="magnitude", compensate="none")], [("layer_prune", {"blocks": 2})],
        [merge], [width(0.85, uniform=True), merge], [width(0.8, uniform=True), merge],
    ], repeats, workdir)


def bench_dinov2_slicing(repeats: int, workdir: Path) -> dict:
    """SliceGPT's two modes on DINOv2: portable (one rotation) against per_layer (a rotation per boundary, shortcut
    matrices) at the same sparsity and at the same parameters (per_layer 33% ~ portable 25%), spectrum widths,
    each alone and with token merging."""
    def sliced(**opts):
        return ("slicegpt", {**SLICE25, **opts})
    merge = ("token_merge", {"r": 12})
    portable, per_layer, per_layer33 = sliced(), sliced(mode="per_layer"), sliced(mode="per_layer", sparsity=0.33)
    return _bench_dinov2([[portable], [per_layer], [sliced(mode="per_layer", schedule="spectrum")], [per_layer33],
                          [portable, merge], [per_layer, merge], [per_layer33, merge]], repeats, workdir)


def bench_token_reduction(repeats: int, workdir: Path) -> dict:
    """ToMe against PiToMe merging and token pruning (EViT class attention, with and without fusion; SpAtten
    received attention) on DINOv2 at the same FLOPs target."""
    target = 0.4
    return _bench_dinov2([
        [("token_merge", {"reduction": target})], [("token_merge", {"reduction": target, "method": "pitome"})],
        [("token_prune", {"reduction": target})], [("token_prune", {"reduction": target, "fuse_pruned": True})],
        [("token_prune", {"reduction": target, "importance": "attention_received"})],
        [("token_prune", {"reduction": target / 2}), ("token_merge", {"reduction": target})],
    ], repeats, workdir)


def _bench_dinov2(settings: list, repeats: int, workdir: Path, train: int = 1000, test: int = 500) -> dict:
    shapes = {"batch": 8, "image_size": [224, 224]}
    handle, eager, rows = build_variants("example:dinov2-small", shapes, settings, workdir)
    pre = preprocessor(handle)
    tr_x, tr_y = data.fashion_mnist("train")
    te_x, te_y = data.fashion_mnist("test")
    train_feeds = pre([tr_x[i] for i in range(train)])
    test_feeds = pre([te_x[i] for i in range(test)])
    timing_batch = {k: v[:8] for k, v in test_feeds.items()}
    dense_test = None
    for r in rows:
        f_tr = embed_all(r["session"], train_feeds, 8)
        f_te = embed_all(r["session"], test_feeds, 8)
        if dense_test is None:
            dense_test = f_te
        cos = cosine_rows(f_te, dense_test)
        r["quality"] = {"cls_cosine_mean": float(cos.mean()), "cls_cosine_p5": float(np.percentile(cos, 5)),
                        "probe_accuracy": linear_probe(f_tr, tr_y[:train], f_te, te_y[:test])}
        print(f"  {r['name']}: {r['quality']}", file=sys.stderr)
    latency = time_rows(eager, rows, timing_batch, repeats)
    return {"example": "dinov2-small", "shapes": shapes, "probe": {"train": train, "test": test},
            "rows": finish(rows, latency, rows[0]["flops"])}


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    quality_keys = [k for k in ("cosine_to_dense_mean", "lee_pearson", "cls_cosine_mean", "probe_accuracy")
                    if any(k in row for row in result["rows"])]
    t = Table(title=f"{result['example']} {result['shapes']} - onnxruntime CPU, {THREADS} threads")
    for col in ["model", "latency ms", "speed-up", "FLOPs ratio", "efficiency", *quality_keys]:
        t.add_column(col, justify="right")
    for row in result["rows"]:
        def fmt(v, f="{:.3f}"):
            return "" if v is None else f.format(v)
        t.add_row(row["name"], fmt(row["latency_ms"], "{:.1f}"), fmt(row["speedup"], "{:.2f}"),
                  fmt(row["flops_ratio"], "{:.2f}"), fmt(row.get("efficiency"), "{:.2f}"),
                  *[fmt(row.get(k), "{:.4f}") for k in quality_keys])
    Console(width=200).print(t)


BENCHES = {"minilm": bench_minilm, "dinov2": bench_dinov2, "dinov2-slicing": bench_dinov2_slicing,
           "minilm-pruning": bench_minilm_pruning, "dinov2-pruning": bench_dinov2_pruning,
           "token-reduction": bench_token_reduction, "pruning-targets": bench_pruning_targets}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results.json")
    parser.add_argument("--only", choices=list(BENCHES),
                        help="one benchmark; the SliceGPT and pruning studies (dinov2-slicing, minilm-pruning, "
                             "dinov2-pruning, token-reduction, pruning-targets) run only when named")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    results = {"threads": THREADS, "torch": torch.__version__, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in BENCHES.items():
            if args.only != name and (args.only or name not in ("minilm", "dinov2")):
                continue
            work = Path(tmp) / name
            work.mkdir()
            start = time.time()
            results[name] = fn(args.repeats, work)
            results[name]["seconds"] = round(time.time() - start, 1)
            print_table(results[name])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
