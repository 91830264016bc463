"""llama.cpp baseline worker (system python with llama-cpp-python; imports llama_cpp,
numpy; not the compressor package). Request: one JSON object on stdin (or argv[1]:
a JSON string or @path); result: one JSON object on stdout.

  {"cmd": "llama", "gguf": PATH, "threads": 2,
   "prompts": [[ids...], ...] | "prompts_file": F, "new_tokens": 64,
   "windows": [[ids]*512, ...] | "windows_file": X.npy}
      decode (if prompts): greedy = argmax of the raw last-token logits (no sampler,
        no EOS stop), one warm-up generation first. prefill_ms = Llama.eval(prompt)
        + argmax (time to the first new token); decode_tok_s = (new_tokens - 1) /
        time of the remaining single-token evals (+ argmax).
      perplexity (if windows): a logits_all=True context with n_ctx = n_batch =
        window length; eval the window from an empty KV cache, NLL of tokens 1..L-1
        from float64 log-softmax of the scores; ppl = exp(mean NLL).
"""
import json
import sys
import time

import numpy as np
from llama_cpp import Llama
from worker_common import peak_rss_mb, read_request, time_prompts, token_lists




def _last_logits(llm):
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def generate(llm, prompt, new_tokens):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    toks = [int(np.argmax(_last_logits(llm)))]
    t1 = time.perf_counter()
    while len(toks) < new_tokens:
        llm.eval([toks[-1]])
        toks.append(int(np.argmax(_last_logits(llm))))
    return toks, t1 - t0, time.perf_counter() - t1


def decode(req, prompts):
    new = int(req.get("new_tokens", 64))
    n_ctx = max(len(p) for p in prompts) + new
    llm = Llama(req["gguf"], n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=req.get("threads", 2),
                n_threads_batch=req.get("threads", 2), logits_all=False, verbose=False)
    return time_prompts(lambda p, n: generate(llm, p, n), prompts, new)


def perplexity(req, windows):
    L = len(windows[0])
    llm = Llama(req["gguf"], n_ctx=L, n_batch=L, n_ubatch=L, n_threads=req.get("threads", 2),
                n_threads_batch=req.get("threads", 2), logits_all=True, verbose=False)
    nll_sum, count, per_window = 0.0, 0, []
    t0 = time.perf_counter()
    for w in windows:
        llm.reset()
        llm.eval(w)
        x = np.asarray(llm.scores[: L - 1], dtype=np.float64)
        m = x.max(axis=1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
        nll = float((lse - x[np.arange(L - 1), np.asarray(w[1:])]).sum())
        per_window.append(float(np.exp(nll / (L - 1))))
        nll_sum += nll
        count += L - 1
    return {"windows": len(windows), "tokens": count, "mean_nll": nll_sum / count,
            "perplexity": float(np.exp(nll_sum / count)), "per_window_ppl": per_window,
            "seconds": time.perf_counter() - t0}


def main():
    req = read_request()
    assert req.get("cmd", "llama") == "llama", req.get("cmd")
    out = {"cmd": "llama", "gguf": req["gguf"], "threads": req.get("threads", 2)}
    prompts = [p.tolist() for p in token_lists(req, "prompts")]
    windows = [w.tolist() for w in token_lists(req, "windows")]
    if prompts:
        out["decode"] = decode(req, prompts)
        out["decode"]["peak_rss_mb"] = peak_rss_mb()
    if windows:
        out["perplexity"] = perplexity(req, windows)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
