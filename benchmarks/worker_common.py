"""What the three benchmark workers share (each runs in its own environment: genai's venv, llama-cpp-python, ours;
they import only the standard library, numpy and this file, which sits beside them on sys.path)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started (VmHWM: reset by exec, unlike ru_maxrss, which keeps the
    forking parent's peak)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def token_lists(req: dict, key: str, dtype=np.int64) -> list[np.ndarray]:
    """req[key] inline, or req[key + "_file"] (.npy or .json), as one array of token ids per prompt / window."""
    if key + "_file" in req:
        path = req[key + "_file"]
        rows = np.load(path) if path.endswith(".npy") else json.load(open(path))
    else:
        rows = req.get(key) or []
    return [np.asarray(x, dtype=dtype) for x in rows]


def read_request() -> dict:
    """One JSON request: argv[1] (JSON, or @path to a JSON file), else standard input."""
    raw = sys.argv[1] if len(sys.argv) > 1 else sys.stdin.read()
    return json.loads(Path(raw[1:]).read_text() if raw.startswith("@") else raw)


def time_prompts(generate, prompts, new_tokens: int) -> dict:
    """One warm-up, then `generate(prompt, new_tokens) -> (tokens, prefill_s, decode_s)` per prompt: time to the first
    token and decode tokens/s over the rest, per prompt and overall."""
    generate(prompts[0], min(new_tokens, 8))
    runs = []
    for p in prompts:
        toks, t_pre, t_dec = generate(p, new_tokens)
        runs.append({"prompt_len": len(p), "prefill_ms": 1e3 * t_pre, "decode_tokens": len(toks) - 1,
                     "decode_s": t_dec, "decode_tok_s": (len(toks) - 1) / t_dec if t_dec > 0 else None, "tokens": toks})
    return {"prefill_ms_median": float(np.median([r["prefill_ms"] for r in runs])),
            "decode_tok_s": sum(r["decode_tokens"] for r in runs) / sum(r["decode_s"] for r in runs), "runs": runs}
