"""Measured budgets: does `compress run --budget speedup=S` land within 5% of S on this machine?

For each encoder example and requested speed-up, run the budget search (examples/*-budget.toml), then read what the
published manifest measured. Prints a table and writes JSON; the timing inside is the artifact against its dense
export at the same static shapes, interleaved, on this machine's onnxruntime (2 threads).

    python benchmarks/budget.py --out benchmarks/budget.json [--only minilm] [--speedups 1.5,2.0]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressor.errors import ValidationFailed  # noqa: E402
from compressor.pipeline.budget import parse_budget, run_budget  # noqa: E402
from compressor.pipeline.recipe import load_recipe  # noqa: E402

RECIPES = {"minilm": ROOT / "examples" / "minilm-budget.toml", "dinov2": ROOT / "examples" / "dinov2-budget.toml"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/budget.json")
    ap.add_argument("--only", choices=sorted(RECIPES))
    ap.add_argument("--speedups", default="1.5,2.0")
    args = ap.parse_args()
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="budget-bench-"))
    for name, recipe_file in RECIPES.items():
        if args.only and name != args.only:
            continue
        for s in (float(v) for v in args.speedups.split(",")):
            t = time.time()
            row = {"model": name, "requested_speedup": s, "load_average_start": os.getloadavg()[0]}
            try:
                m = run_budget(load_recipe(recipe_file), parse_budget(f"speedup={s}"), scratch / f"{name}-{s}",
                               progress=lambda msg: print(f"  {name} {s}x: {msg}", flush=True))
                b = m["budget"]
                row.update(measured_speedup=b["measured"]["speedup"], flops_kept=b["measured"]["flops"],
                           within_tolerance=b["within_tolerance"], passes=[p["name"] for p in m["passes"]],
                           cosine_to_dense_mean=m["validation"]["cosine_to_dense_mean"])
            except ValidationFailed as e:
                row.update(failed=str(e))
            row.update(seconds=round(time.time() - t, 1), load_average_end=os.getloadavg()[0])
            rows.append(row)
            print(json.dumps(row), flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n{'model':8} {'requested':>9} {'measured':>9} {'FLOPs kept':>10} {'cosine':>7} {'within 5%':>9} {'s':>6}")
    for r in rows:
        print(f"{r['model']:8} {r['requested_speedup']:9.2f} {r.get('measured_speedup', float('nan')):9.2f} "
              f"{r.get('flops_kept', float('nan')):10.3f} {r.get('cosine_to_dense_mean', float('nan')):7.3f} "
              f"{str(r.get('within_tolerance', False)):>9} {r['seconds']:6.0f}")
    Path(args.out).write_text(json.dumps({"threads": 2, "tolerance": 0.05, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
