"""SliceGPT (portable) plus the bounded recovery step on SmolLM2-135M: held-out perplexity against parameters.

    python benchmarks/slicegpt_recovery.py --out benchmarks/slicegpt_recovery.json \
        [--sparsities 0.15,0.2] [--tie-head] [--steps 600] [--batch 8] [--seq-len 512] [--device auto]

Each sparsity is sliced once (128 x 512 calibration tokens, per-token normalised PCA), then distilled from the
dense model for each step count (KL to the teacher's next-token distribution on calibration windows only).
Perplexity: non-overlapping 512-token windows of the held-out articles (the slicegpt_protocol.py protocol).
Distillation runs on a GPU when one is present (--device auto); on 2 CPU cores it reads about 83 tokens a second.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from compressor.program.handle import load
from compressor.sources.lm_data import held_out_windows, torch_perplexity
from compressor.pipeline.pass_manager import Pipeline
from compressor.passes import Distill, SliceGPT
from compressor.validation.lm import program_logits


def perplexity(handle, windows) -> float:
    return torch_perplexity(program_logits(handle.program(), handle.adapter), windows)


def row(handle, windows, **fields) -> dict:
    out = {**fields, "params": sum(p.numel() for p in handle.adapter.model.parameters()), "perplexity": perplexity(handle, windows)}
    print(json.dumps(out), flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/slicegpt_recovery.json")
    parser.add_argument("--sparsities", default="0.15,0.2")
    parser.add_argument("--tie-head", action="store_true", help="keep the LM head tied to the embedding")
    parser.add_argument("--steps", default="600", help="comma-separated distillation step counts (0: sliced only)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dense = load("example:smollm2")
    windows = held_out_windows(dense.adapter.tokenizer_file, 512, args.windows)
    rows = [row(dense, windows, sparsity=0.0, tie_head=None, steps=0)]
    for sparsity in (float(s) for s in args.sparsities.split(",")):
        handle = load("example:smollm2")
        start = time.perf_counter()
        Pipeline([SliceGPT(sparsity=sparsity, normalize_tokens=True, tie_head=args.tie_head)]).run(handle)
        base = row(handle, windows, sparsity=sparsity, tie_head=args.tie_head, steps=0,
                   slicing_seconds=round(time.perf_counter() - start, 1))
        rows.append(base)
        for steps in (int(s) for s in args.steps.split(",") if int(s) > 0):
            student = copy.deepcopy(handle)
            Pipeline([Distill(steps=steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr, device=args.device)]).run(student)
            info = student.history[-1]["info"]
            rows.append(row(student, windows, sparsity=sparsity, tie_head=args.tie_head, steps=steps,
                            distill_tokens=info["tokens"], distill_seconds=info["seconds"], distill_device=info["device"]))
    result = {"windows": int(len(windows)), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"SmolLM2-135M SliceGPT + distillation, {len(windows)} held-out windows of 512")
    for col in ("slicing", "tied head", "distill steps", "tokens", "params (M)", "params ratio", "perplexity", "ratio to dense", "distill time"):
        t.add_column(col, justify="right")
    d = rows[0]
    for r in rows:
        t.add_row(f"{r['sparsity']:.0%}", "" if r["tie_head"] is None else str(r["tie_head"]), str(r["steps"]),
                  str(r.get("distill_tokens", "")), f"{r['params'] / 1e6:.1f}", f"{r['params'] / d['params']:.3f}",
                  f"{r['perplexity']:.2f}", f"{r['perplexity'] / d['perplexity']:.2f}",
                  f"{r['distill_seconds']:.0f} s ({r['distill_device']})" if "distill_seconds" in r else "")
    Console(width=180).print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
