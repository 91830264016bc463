"""One PNG per model for the structured-pruning comparison, from the committed benchmark JSON (no model is run):

    python benchmarks/plot_pruning.py --out docs

- docs/pruning_smollm2.png: perplexity (x dense, log) against parameters kept, every method at 0.85x and 0.75x
  (benchmarks/pruning_smollm2.json), and against measured prefill / decode speed-up where a row was timed;
- docs/pruning_minilm.png: Lee correlation and cosine to dense against measured speed-up
  (benchmarks/minilm_pruning.json, benchmarks/pruning_targets.json);
- docs/pruning_dinov2.png: CLS cosine and linear-probe accuracy against measured speed-up
  (benchmarks/pruning_targets.json).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent


def load(name: str) -> dict:
    path = HERE / name
    return json.loads(path.read_text()) if path.exists() else {}


def family(name: str) -> str:
    for key in ("token_merge", "layer_prune", "width_prune", "slicegpt"):
        if key in name:
            return key
    return "dense"


COLOURS = {"layer_prune": "tab:blue", "width_prune": "tab:orange", "slicegpt": "tab:green", "token_merge": "tab:purple", "dense": "black"}


def smollm2(out: Path) -> Path | None:
    data = load("pruning_smollm2.json")
    rows = [r for r in data.get("rows", []) if r["perplexity_ratio"] < 20]  # broken baselines off the scale
    if not rows:
        return None
    timed = [r for r in data["rows"] if "speed" in r]
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(13 if timed else 7, 5), squeeze=False)
    ax = axes[0][0]
    for r in rows:
        ax.scatter(r["params_ratio"], r["perplexity_ratio"], color=COLOURS[family(r["variant"])], marker="o" if r["target_params"] == 0.85 else "s")
        ax.annotate(r["variant"].replace("width_prune ", "w: ").replace("layer_prune ", "l: "), (r["params_ratio"], r["perplexity_ratio"]), fontsize=7)
    ax.set(xlabel="parameters kept (x dense)", ylabel=f"perplexity (x dense {data['dense_perplexity']:.2f})", yscale="log",
           title=f"SmolLM2-135M, no recovery ({data['windows']} x {data['window_len']} held-out tokens)")
    if timed:
        ax = axes[0][1]
        for r in timed:
            s = r["speed"]
            for key, marker, what in (("speedup", "o", "prefill"), ("decode_speedup", "^", "decode")):
                ax.scatter(s[key], r["perplexity_ratio"], color=COLOURS[family(r["variant"])], marker=marker)
                ax.annotate(f"{r['variant']} ({what})", (s[key], r["perplexity_ratio"]), fontsize=7)
        ax.set(xlabel="measured speed-up over the dense export (o prefill 1 x 512, ^ 64 decode steps)", ylabel="perplexity (x dense)",
               title="onnxruntime CPU, 2 threads, interleaved")
    return save(fig, out / "pruning_smollm2.png")


def speed_panels(rows: list[dict], keys: list[tuple[str, str]], title: str, path: Path) -> Path | None:
    rows = [r for r in rows if r.get("speedup")]
    if not rows:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(7 * len(keys), 5), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys):
        for r in rows:
            if r.get(key) is None:
                continue
            ax.scatter(r["speedup"], r[key], color=COLOURS[family(r["name"])])
            ax.annotate(short(r["name"]), (r["speedup"], r[key]), fontsize=6)
        ax.set(xlabel="measured speed-up over the dense export (same shapes, FP32)", ylabel=label, title=title)
    return save(fig, path)


def short(name: str) -> str:
    """A compact label: pass names abbreviated, the text-merging example's options dropped, no quotes or braces."""
    name = re.sub(r"token_merge \{'r': (\d+)\}", r"tome r=\1", name.replace("onnxruntime ", ""))
    name = re.sub(r"token_merge \{[^}]*\}", "tome", name)
    for a, b in (("'importance': 'activation', ", ""), ("'compensate': 'least_squares'", "ls"), ("width_prune", "w"),
                 ("layer_prune", "l"), ("'", ""), ("{", ""), ("}", ""), ("importance: ", ""), ("compensate: ", "")):
        name = name.replace(a, b)
    return name


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    targets = load("pruning_targets.json").get("pruning-targets", {})
    minilm = load("minilm_pruning.json").get("minilm-pruning", {}).get("rows", []) + targets.get("minilm", {}).get("rows", [])[1:]
    written = [smollm2(out),
               speed_panels(minilm, [("lee_pearson", "Lee correlation (human judgements)"), ("cosine_to_dense_mean", "cosine to dense")],
                            "MiniLM 16 x 128, onnxruntime CPU, 2 threads", out / "pruning_minilm.png"),
               speed_panels(targets.get("dinov2", {}).get("rows", []), [("cls_cosine_mean", "CLS cosine to dense"), ("probe_accuracy", "Fashion-MNIST linear probe")],
                            "DINOv2-S 8 x 224, onnxruntime CPU, 2 threads", out / "pruning_dinov2.png")]
    for p in written:
        if p:
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
