"""SliceGPT on SmolLM2-135M under the reference implementation's protocol, both modes, several sparsities.

    python benchmarks/slicegpt_protocol.py --out benchmarks/slicegpt.json [--windows 64] [--samples 128]
    python benchmarks/slicegpt_protocol.py --stripper gensim --modes per_layer --out benchmarks/slicegpt_gensim_text.json
    python benchmarks/slicegpt_protocol.py --modes per_layer --schedule spectrum --out benchmarks/slicegpt_spectrum.json

Calibration: 128 x 512 tokens (seed 42) from the first 80% of the gensim Wikipedia articles (84, file order).
Perplexity: non-overlapping 512-token windows over the remaining 22 articles (64 windows), mean NLL, exp.
Rows: dense, folded only (0%), per_layer (the paper's mode, raw second moment, LM head not sliced), portable
(one rotation, per-token normalised second moment) at 20/25/30%. Slicing time is the pass's wall time on this
machine (torch threads as set by --threads).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from compressor.program.handle import load
from compressor.sources.lm_data import held_out_windows, torch_perplexity
from compressor.pipeline.pass_manager import Pipeline
from compressor.passes import SliceGPT
from compressor.validation.lm import program_logits

REFERENCE = {0.2: 62.17, 0.25: 82.42, 0.3: 115.76}  # microsoft/TransformerCompression per_layer, as measured in the issue


def run(mode: str | None, sparsity: float, samples: int, windows, schedule: str = "uniform") -> dict:
    handle = load("example:smollm2")
    start = time.perf_counter()
    if mode is not None:
        options = {"sparsity": sparsity, "calibration_samples": samples, "calibration_len": 512, "seed": 42}
        if mode == "portable":
            options.update(normalize_tokens=True)
        if sparsity > 0:
            options["mode"] = mode
        if mode == "per_layer" and sparsity > 0 and schedule != "uniform":
            options["schedule"] = schedule
        Pipeline([SliceGPT(**options)]).run(handle)
    seconds = time.perf_counter() - start
    ppl = torch_perplexity(program_logits(handle.program(), handle.adapter), windows)
    info = handle.history[-1]["info"] if handle.history else {}
    row = {"mode": mode or "dense", "sparsity": sparsity, "hidden": info.get("width_after", 576),
           "schedule": info.get("width_schedule"), "boundary_widths": info.get("boundary_widths"),
           "params": sum(p.numel() for p in handle.adapter.model.parameters()), "perplexity": ppl,
           "slicing_seconds": round(seconds, 1) if mode and sparsity > 0 else None,
           "reference_perplexity": REFERENCE.get(sparsity) if mode == "per_layer" and schedule == "uniform" else None}
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/slicegpt.json")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sparsities", default="0.2,0.25,0.3")
    parser.add_argument("--modes", default="per_layer,portable")
    parser.add_argument("--schedule", default="uniform", choices=["uniform", "spectrum"],
                        help="per_layer widths: every boundary at the same width, or from each boundary's eigen-spectrum")
    parser.add_argument("--stripper", default="builtin", choices=["builtin", "gensim"],
                        help="wiki markup stripper: ours, or gensim's filter_wiki (needs gensim; closer to the reference's text)")
    args = parser.parse_args()
    os.environ["COMPRESSOR_WIKI_STRIPPER"] = args.stripper
    torch.set_num_threads(args.threads)
    windows = held_out_windows(load("example:smollm2").adapter.tokenizer_file, 512, args.windows)
    rows = [run(None, 0.0, args.samples, windows), run("portable", 0.0, args.samples, windows)]
    rows[1]["mode"] = "folded only"
    for mode in args.modes.split(","):
        for s in (float(x) for x in args.sparsities.split(",")):
            rows.append(run(mode, s, args.samples, windows, args.schedule))
    result = {"windows": int(len(windows)), "calibration": f"{args.samples} x 512", "threads": args.threads,
              "stripper": args.stripper, "schedule": args.schedule, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"SmolLM2-135M SliceGPT, {len(windows)} held-out windows of 512, calibration {args.samples} x 512")
    for col in ("mode", "schedule", "slicing", "hidden", "params (M)", "perplexity", "reference", "slicing time (s)"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["mode"], r["schedule"] or "", f"{r['sparsity']:.0%}", str(r["hidden"]), f"{r['params'] / 1e6:.1f}", f"{r['perplexity']:.2f}",
                  "" if r["reference_perplexity"] is None else f"{r['reference_perplexity']:.2f}",
                  "" if r["slicing_seconds"] is None else f"{r['slicing_seconds']:.0f}")
    Console(width=160).print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
