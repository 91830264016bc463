"""Our language-model artifacts, measured the way benchmarks/genai_worker.py measures onnxruntime-genai's builds.

Runs in the project's python with the torch-free runtime only (compressor.runtime: numpy + onnxruntime). One JSON
request on stdin (or argv[1]: JSON or @path), one JSON result on stdout; same commands and fields as genai_worker:

  {"cmd": "decode", "model": DIR, "prompts": [[ids...]], "new_tokens": 64, "threads": 2}
      greedy, end-of-sequence ignored (exactly new_tokens), one warm-up generation first.
      prefill_ms = prompt prefill + the first token's argmax (time to the first new token);
      decode_tok_s = (new_tokens - 1) / time of the remaining steps.
  {"cmd": "prefill", "model": DIR, "prompts": [[ids]], "lengths": [128, 512], "runs": 5}
  {"cmd": "perplexity", "model": DIR, "windows_file": X.npy}
Every result carries peak_rss_mb (this process's peak resident memory: the model, its session and the run).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.runtime import load  # noqa: E402
from worker_common import peak_rss_mb, read_request, time_prompts, token_lists  # noqa: E402




def generate(lm, prompt, new_tokens):
    it = lm.stream(prompt.tolist(), max_new_tokens=new_tokens, stop_on_eos=False)
    t0 = time.perf_counter()
    tokens = [next(it)]
    t1 = time.perf_counter()
    tokens += list(it)
    t2 = time.perf_counter()
    return tokens, t1 - t0, t2 - t1


def cmd_decode(lm, req):
    prompts, new = token_lists(req, "prompts"), int(req.get("new_tokens", 64))
    return time_prompts(lambda p, n: generate(lm, p, n), prompts, new)


def cmd_prefill(lm, req):
    prompt, res = token_lists(req, "prompts")[0], {}
    for length in req.get("lengths", [128, 512]):
        ms = []
        for i in range(int(req.get("runs", 5)) + 1):  # first run: warm-up
            it = lm.stream(prompt[:length].tolist(), max_new_tokens=1, stop_on_eos=False)
            t0 = time.perf_counter()
            next(it)
            if i:
                ms.append(1e3 * (time.perf_counter() - t0))
        res[str(length)] = {"min_ms": min(ms), "median_ms": float(np.median(ms)), "runs_ms": ms}
    return {"prefill": res}


def cmd_perplexity(lm, req):
    return {"perplexity": lm.perplexity(np.stack(token_lists(req, "windows")))}


def main():
    req = read_request()
    lm = load(req["model"], threads=int(req.get("threads", 2)))
    out = {"decode": cmd_decode, "prefill": cmd_prefill, "perplexity": cmd_perplexity}[req["cmd"]](lm, req)
    out.update(cmd=req["cmd"], model=req["model"], peak_rss_mb=peak_rss_mb())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
