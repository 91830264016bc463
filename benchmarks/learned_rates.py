"""learned_rates (DiffRate as a compiler step) against the best hand schedules at the same FLOPs budget.

    python benchmarks/learned_rates.py --out benchmarks/learned_rates.json [--only dinov2|minilm] [--budget 0.5]
        [--steps N] [--samples N] [--learned exchange_samples=N --learned exchanges=N]

Every row is a token schedule on the same frozen weights, compiled by the static program (PyTorch; the exported
ONNX agrees with it statistically, which the export tests check), measured in one run:
- DINOv2-S (224 x 224, batch 8): CLS cosine to dense on held-out Fashion-MNIST test images, linear-probe accuracy
  (benchmarks/run.py's probe, trained on each schedule's own features of training images 0.., which the calibration
  draw, from index 5000, never touches), and the dense model's probe kept as deployed (its accuracy on each
  schedule's features, and how often it predicts what it predicts on dense features).
- MiniLM (16 x 128): cosine of pooled embeddings to dense on held-out Lee sentences, and Pearson correlation with
  the human judgements on the 50 Lee documents.
`learned_vs_best_hand` sets the learned row beside the best hand row on each measure, with a paired bootstrap 95%
interval of the difference where the measure is per sample (an interval above 0 is a win beyond sampling noise).
FLOPs are counted on each schedule's captured graph (fraction of dense kept); `seconds` is the pass's wall time
(the rate search, for learned rows) on this machine. Published anchor: DiffRate DeiT-S 4.6 -> 2.9 GFLOPs (63%) at
79.54% top-1 off the shelf (weights frozen), after 3 ImageNet epochs of rate search on GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import linear_probe, probe_classifier  # noqa: E402

from compressor.validation.encoder import cosine_rows  # noqa: E402
from compressor.pipeline.registry import make_pass  # noqa: E402
from compressor.pipeline.pass_manager import Pipeline  # noqa: E402
from compressor.program.encoder import TokenPlan  # noqa: E402
from compressor.program.handle import load  # noqa: E402
from compressor.sources import data  # noqa: E402
from compressor.sources.inputs import preprocessor  # noqa: E402


def embed(handle, feeds: dict, batch: int) -> np.ndarray:
    program = handle.program()
    names = [s.name for s in handle.input_specs()]
    n = len(feeds[names[0]])
    out = []
    with torch.inference_mode():
        for i in range(0, n, batch):
            out.append(program(*(torch.from_numpy(feeds[k][i:i + batch]) for k in names)).numpy())
    return np.concatenate(out)


def apply(handle, name: str, options: dict) -> dict:
    """Run one pass on a fresh token plan; its FLOPs fraction on the captured graph, wall time and decision."""
    handle.plan, handle.history = TokenPlan(), []
    start = time.perf_counter()
    Pipeline([make_pass(name, options)]).run(handle)
    seconds = time.perf_counter() - start
    rec = handle.history[-1]
    info = rec["info"]
    return {"pass": name, "options": options, "flops_kept": rec["flops_after"] / rec["flops_before"],
            "seconds": round(seconds, 1), "merges": handle.plan.merges, "prunes": list(handle.plan.prunes),
            "token_counts": handle.plan.token_counts(handle.num_tokens, handle.num_layers),
            **({"search": {k: info[k] for k in ("search_seconds", "flops_fraction_learned", "start",
                                                 "chosen", "loss_first", "loss_last")}} if name == "learned_rates" else {})}


def variants(budget: float, image: bool, steps: int, samples: int, extra: dict) -> list[tuple[str, dict]]:
    """Hand schedules at the budget (token_merge's smallest constant r, and every decaying one the search may start
    from), then the learned one (pruning and merging where the model has a class token, else merging)."""
    from compressor.passes.learned_rates import DECAYS

    learned = {"flops": budget, "steps": steps, "calibration_samples": samples, **extra}
    rows = [("token_merge", {"reduction": 1 - budget, **({"decay": d} if d < 1 else {})}) for d in DECAYS]
    return rows + [("learned_rates", learned if image else {**learned, "prune": False})]


def bench_dinov2(budget: float, steps: int, samples: int, train: int, test: int, extra: dict) -> dict:
    handle = load("example:dinov2-small", batch=8, image_size=[224, 224])
    pre = preprocessor(handle)
    tr_x, tr_y = data.fashion_mnist("train")
    te_x, te_y = data.fashion_mnist("test")
    train_feeds = pre([tr_x[i] for i in range(train)])
    test_feeds = pre([te_x[i] for i in range(test)])
    dense_tr, dense_te = embed(handle, train_feeds, 8), embed(handle, test_feeds, 8)
    head = probe_classifier(dense_tr, tr_y[:train])  # the dense model's classifier, kept as the user deploys it
    dense_pred = head(dense_te)
    rows = [{"name": "dense", "flops_kept": 1.0, "cls_cosine_mean": 1.0, "cls_cosine_p5": 1.0,
             "probe_accuracy": linear_probe(dense_tr, tr_y[:train], dense_te, te_y[:test]),
             "dense_head_accuracy": float((dense_pred == te_y[:test]).mean()), "dense_head_agreement": 1.0}]
    per_sample = {}
    for name, options in variants(budget, True, steps, samples, extra):
        row = apply(handle, name, options)
        f_tr, f_te = embed(handle, train_feeds, 8), embed(handle, test_feeds, 8)
        cos = cosine_rows(f_te, dense_te)
        pred = head(f_te)
        row.update(name=label(name, options), cls_cosine_mean=float(cos.mean()), cls_cosine_p5=float(np.percentile(cos, 5)),
                   probe_accuracy=linear_probe(f_tr, tr_y[:train], f_te, te_y[:test]),
                   dense_head_accuracy=float((pred == te_y[:test]).mean()), dense_head_agreement=float((pred == dense_pred).mean()))
        per_sample[row["name"]] = {"cls_cosine_mean": cos, "dense_head_agreement": (pred == dense_pred).astype(float),
                                   "dense_head_accuracy": (pred == te_y[:test]).astype(float)}
        rows.append(row)
        print(f"  {row['name']}: flops {row['flops_kept']:.3f} cos {row['cls_cosine_mean']:.4f} probe {row['probe_accuracy']:.3f} "
              f"dense head {row['dense_head_accuracy']:.3f} agree {row['dense_head_agreement']:.3f} ({row['seconds']} s)", file=sys.stderr)
    return {"example": "dinov2-small", "shapes": handle.shapes, "budget_flops_kept": budget,
            "probe": {"train": train, "test": test}, "rows": rows,
            "learned_vs_best_hand": versus_best_hand(rows, per_sample, ("cls_cosine_mean", "probe_accuracy",
                                                                         "dense_head_accuracy", "dense_head_agreement"))}


def bench_minilm(budget: float, steps: int, samples: int, held: int, extra: dict) -> dict:
    handle = load("example:minilm", batch=16, seq_len=128)
    pre = preprocessor(handle)
    held_out = pre(data.text_split("validation", held))
    lee = pre(data.lee_documents())
    human = data.lee_human_similarities()
    iu = np.triu_indices(50, k=1)

    def lee_pearson(emb):
        unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        return float(np.corrcoef((unit @ unit.T)[iu], human[iu])[0, 1])

    dense_held, dense_lee = embed(handle, held_out, 16), embed(handle, lee, 16)
    per_sample = {}
    rows = [{"name": "dense", "flops_kept": 1.0, "cosine_mean": 1.0, "lee_cosine_mean": 1.0, "lee_pearson": lee_pearson(dense_lee)}]
    for name, options in variants(budget, False, steps, samples, extra):
        options = {**options, "proportional_attention": False}  # as the MiniLM recipe: closer embeddings for this model
        row = apply(handle, name, options)
        e_held, e_lee = embed(handle, held_out, 16), embed(handle, lee, 16)
        row.update(name=label(name, options), cosine_mean=float(cosine_rows(e_held, dense_held).mean()),
                   lee_cosine_mean=float(cosine_rows(e_lee, dense_lee).mean()), lee_pearson=lee_pearson(e_lee))
        per_sample[row["name"]] = {"cosine_mean": cosine_rows(e_held, dense_held), "lee_cosine_mean": cosine_rows(e_lee, dense_lee)}
        rows.append(row)
        print(f"  {row['name']}: flops {row['flops_kept']:.3f} cos {row['cosine_mean']:.4f} lee-doc cos {row['lee_cosine_mean']:.4f} pearson {row['lee_pearson']:.3f} ({row['seconds']} s)", file=sys.stderr)
    return {"example": "minilm", "shapes": handle.shapes, "budget_flops_kept": budget, "held_out_sentences": held,
            "rows": rows, "learned_vs_best_hand": versus_best_hand(rows, per_sample, ("cosine_mean", "lee_cosine_mean", "lee_pearson"))}


def versus_best_hand(rows: list[dict], per_sample: dict, metrics) -> dict:
    """For each quality measure: the best hand schedule on it, the learned row, and (for per-sample measures) a
    paired bootstrap 95% interval of learned minus that hand row over the test samples (1000 resamples): an interval
    above 0 is a win beyond sampling noise."""
    learned = next(r for r in rows if r["name"].startswith("learned"))
    hand = [r for r in rows if r["name"].startswith("token_merge")]
    rng = np.random.default_rng(0)
    out = {}
    for m in metrics:
        best = max(hand, key=lambda r: r[m])
        entry = {"best_hand": best["name"], "hand": best[m], "learned": learned[m], "difference": learned[m] - best[m]}
        if m in per_sample.get(learned["name"], {}):
            diff = per_sample[learned["name"]][m] - per_sample[best["name"]][m]
            boots = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(1000)]
            entry["difference_ci95"] = [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]
        out[m] = entry
    return out


def label(name: str, options: dict) -> str:
    if name == "token_merge":
        return f"token_merge constant r (decay {options.get('decay', 1.0)})"
    return "learned_rates merge" if options.get("prune") is False else "learned_rates prune+merge"


def print_table(result: dict) -> None:
    quality = [k for k in ("cls_cosine_mean", "cls_cosine_p5", "probe_accuracy", "dense_head_accuracy",
                           "dense_head_agreement", "cosine_mean", "lee_cosine_mean", "lee_pearson") if k in result["rows"][0]]
    print(f"\n{result['example']} {result['shapes']} at {result['budget_flops_kept']:.0%} of dense FLOPs")
    print(" | ".join(["schedule", "FLOPs kept", *quality, "seconds"]))
    for r in result["rows"]:
        print(" | ".join([r["name"], f"{r['flops_kept']:.3f}", *(f"{r[k]:.4f}" for k in quality), str(r.get("seconds", "-"))]))
    for m, e in result.get("learned_vs_best_hand", {}).items():
        ci = e.get("difference_ci95")
        print(f"learned vs best hand on {m} ({e['best_hand']}): {e['learned']:.4f} vs {e['hand']:.4f}"
              + (f", paired 95% interval of the difference [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/learned_rates.json")
    ap.add_argument("--only", choices=["dinov2", "minilm"])
    ap.add_argument("--budget", type=float, default=0.5, help="fraction of dense FLOPs to keep")
    ap.add_argument("--steps", type=int, default=None, help="search steps (default: the pass's)")
    ap.add_argument("--samples", type=int, default=None, help="calibration samples (default: the pass's)")
    ap.add_argument("--probe-train", type=int, default=500)
    ap.add_argument("--probe-test", type=int, default=250)
    ap.add_argument("--learned", action="append", default=[], metavar="KEY=VALUE",
                    help="another learned_rates option (integers), e.g. --learned exchange_samples=128")
    args = ap.parse_args()
    extra = {k: int(v) for k, v in (o.split("=", 1) for o in args.learned)}
    torch.set_num_threads(2)
    from compressor.passes.learned_rates import LearnedRatesConfig

    defaults = LearnedRatesConfig(flops=args.budget)
    steps, samples = args.steps or defaults.steps, args.samples or defaults.calibration_samples
    out = Path(args.out)
    results = json.loads(out.read_text()) if args.only and out.exists() else {}  # --only updates its own section
    run = {"threads": torch.get_num_threads(), "steps": steps, "calibration_samples": samples, **extra}
    if args.only in (None, "minilm"):
        results["minilm"] = {**run, **bench_minilm(args.budget, steps, samples, 256, extra)}
        print_table(results["minilm"])
    if args.only in (None, "dinov2"):
        results["dinov2"] = {**run, **bench_dinov2(args.budget, steps, samples, args.probe_train, args.probe_test, extra)}
        print_table(results["dinov2"])
    out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
