"""Language-model deployment benchmark: our artifacts against what an LLM user runs on a CPU today, in one run.

Rows per model: onnxruntime-genai's FP32 build (dense), its INT4 build (`builder -p int4 -e cpu`: 4-bit RTN,
block 32, accuracy_level 4), llama-cpp-python on the source GGUF (when installed), and each of our artifacts. Each
row runs in its own process (its peak memory is that process's), 2 threads; decode rounds are interleaved across
rows so the ratios hold on a loaded machine (the JSON states the load average). Held-out data: the last 20% of the
Wikipedia articles, never the calibration part; 128-token prompts from it, 64 greedy tokens (end-of-sequence
ignored), perplexity over 16 windows of 512 tokens, prefill at 128 and 512 tokens.

Set-up: benchmarks/setup_genai.sh builds the genai baselines in their own venv (transformers 5); llama-cpp-python is
optional (`pip install llama-cpp-python`, compiles 15-40 min). Then, with the artifacts built by `compress run`:
  python benchmarks/llm_deploy.py --model smollm2 --artifact int4=out/smollm2-int4 --artifact deploy=out/smollm2-deploy
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GENAI_PY = Path(os.environ.get("GENAI_VENV", "/work/genai-venv")) / "bin" / "python"
GENAI_BUILDS = Path(os.environ.get("GENAI_BUILDS", "/work/genai-builds"))
SOURCES = {"smollm2": "example:smollm2", "gemma3-270m": "example:gemma3-270m"}


def folder_size_mb(path: Path) -> float:
    """What a deployment ships: every file but our artifacts' optional stock transformers folder (hf/)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and "hf" not in f.relative_to(path).parts[:1]) / 1e6


def call(python: str, worker: str, request: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(request, f)
    try:
        done = subprocess.run([python, str(ROOT / "benchmarks" / worker), "@" + f.name], capture_output=True,
                              text=True, timeout=3600)
    finally:
        os.unlink(f.name)
    if done.returncode:
        raise RuntimeError(f"{worker} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def data(model: str, workdir: Path) -> tuple[Path, Path]:
    """Held-out windows (16 x 512) and prompts (4 x 128 tokens from the first windows), as files for the workers."""
    from compressor.sources.examples import example_folder
    from compressor.sources.lm_data import held_out_windows

    windows = held_out_windows(example_folder(model.replace("example:", "")) / "tokenizer.json", 512, 16)
    wfile, pfile = workdir / f"{model}-windows.npy", workdir / f"{model}-prompts.json"
    np.save(wfile, windows.astype(np.int64))
    pfile.write_text(json.dumps(windows[:4, :128].tolist()))
    return wfile, pfile


def rows_for(model: str, artifacts: dict[str, Path], gguf: Path | None) -> dict[str, dict]:
    rows = {}
    for precision, label in (("fp32", "onnxruntime-genai FP32 (dense)"), ("int4", "onnxruntime-genai INT4")):
        folder = GENAI_BUILDS / f"{model}-{precision}"
        if GENAI_PY.exists() and folder.exists():
            rows[label] = {"kind": "genai", "path": folder}
    if gguf is not None:
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is not None:
            rows["llama-cpp-python (source GGUF)"] = {"kind": "llama", "path": gguf}
    for name, path in artifacts.items():
        rows[f"ours: {name}"] = {"kind": "ours", "path": path}
    return rows


def measure(row: dict, cmd: str, wfile: Path, pfile: Path) -> dict:
    if row["kind"] == "llama":
        req = {"cmd": "llama", "gguf": str(row["path"]), "threads": 2, "new_tokens": 64}
        req.update({"prompts_file": str(pfile)} if cmd == "decode" else {"windows_file": str(wfile)})
        out = call(sys.executable, "llama_worker.py", req)
        return out["decode"] if cmd == "decode" else out["perplexity"]
    python, worker = (str(GENAI_PY), "genai_worker.py") if row["kind"] == "genai" else (sys.executable, "lm_worker.py")
    req = {"cmd": cmd, "model": str(row["path"]), "threads": 2}
    if cmd == "decode":
        req.update(prompts_file=str(pfile), new_tokens=64)
    elif cmd == "prefill":
        prompt = np.load(wfile)[0].tolist()
        req.update(prompts=[prompt], lengths=[128, 512], runs=3)
    else:
        req.update(windows_file=str(wfile))
    return call(python, worker, req)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=sorted(SOURCES))
    ap.add_argument("--artifact", action="append", default=[], help="NAME=FOLDER of one of our artifacts")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved decode rounds")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from compressor.sources.examples import example_gguf

    artifacts = dict(a.split("=", 1) for a in args.artifact)
    rows = rows_for(args.model, {k: Path(v) for k, v in artifacts.items()}, example_gguf(args.model))
    workdir = Path(tempfile.mkdtemp())
    wfile, pfile = data(args.model, workdir)
    results = {name: {"path": str(r["path"]), "size_mb": round(folder_size_mb(r["path"]) if r["path"].is_dir()
                                                              else r["path"].stat().st_size / 1e6, 1)} for name, r in rows.items()}
    loads = [os.getloadavg()[0]]
    for rnd in range(args.rounds):
        for name, row in rows.items():
            out = measure(row, "decode", wfile, pfile)
            res = results[name]
            res.setdefault("decode_tok_s_rounds", []).append(round(out["decode_tok_s"], 2))
            res.setdefault("prefill_128_ms_rounds", []).append(round(out["prefill_ms_median"], 1))
            if "peak_rss_mb" in out:
                res["peak_rss_mb"] = round(max(res.get("peak_rss_mb", 0), out["peak_rss_mb"]), 1)
            res["tokens"] = [r["tokens"] for r in out["runs"]]
            print(f"round {rnd} {name}: {out['decode_tok_s']:.1f} tok/s", flush=True)
        loads.append(os.getloadavg()[0])
    for name, row in rows.items():
        res = results[name]
        if row["kind"] != "llama":
            pre = measure(row, "prefill", wfile, pfile)["prefill"]
            res["prefill_ms"] = {k: round(v["median_ms"], 1) for k, v in pre.items()}
        res["perplexity"] = round(measure(row, "perplexity", wfile, pfile)["perplexity"], 3)
        res["decode_tok_s"] = float(np.median(res["decode_tok_s_rounds"]))
        print(f"{name}: ppl {res['perplexity']}", flush=True)
    base = next((r for n, r in results.items() if n == "onnxruntime-genai INT4"), None)
    dense = next((r for n, r in results.items() if "dense" in n), None)
    for res in results.values():
        if base:
            res["decode_vs_genai_int4"] = round(res["decode_tok_s"] / base["decode_tok_s"], 3)
        if dense:
            res["perplexity_vs_dense"] = round(res["perplexity"] / dense["perplexity"], 4)
        if base and res.get("tokens"):
            res["greedy_same_as_genai_int4"] = float(np.mean([a == b for a, b in zip(res["tokens"], base["tokens"])]))
    report = {"model": args.model, "threads": 2, "prompt_tokens": 128, "new_tokens": 64, "perplexity_windows": "16 x 512",
              "data": "held-out Wikipedia (gensim test data, last 20% of the articles; calibration uses the first 80%)",
              "load_average_1min": [round(x, 2) for x in loads], "when": time.strftime("%Y-%m-%d %H:%M"),
              "cpu": "2 cores, AVX2, no AVX-512/VNNI", "rows": results}
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
