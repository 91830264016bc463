"""Validation of a KV-cache policy (passes/kv_cache.py) at compile time: the shipped graph under its compiled policy
against the same graph with the full cache, on a held-out Wikipedia prompt longer than the budget.

Teacher forced (both caches read the true next tokens): the perplexity of the continuation and how often the two
caches' next-token argmax agree. Free-running greedy agreement is left to the benchmark: one near-tie flips it, even
between two equivalent full caches (benchmarks/kv_cache.md).
"""

from __future__ import annotations

import numpy as np

from compressor.runtime.lm import _log_softmax
from compressor.sources.lm_data import held_out_windows


def validate_kv_policy(lm, tokenizer_file, cfg) -> dict:
    """`lm` is the runtime CausalLM of the artifact; returns the manifest's validation["kv_policy"] record (with
    `failure` when cfg.max_kv_perplexity_ratio is set and exceeded)."""
    cont = cfg.kv_continuation
    prompt_len = min(cfg.kv_prompt_len, int(lm.max_length) - cont - 2)
    windows = held_out_windows(tokenizer_file, prompt_len + cont, cfg.kv_windows)
    nll = {"full": 0.0, "policy": 0.0}
    agree, slots = [], None
    for w in windows:
        prompt, continuation = w[:prompt_len].tolist(), w[prompt_len:].tolist()
        first, (full, policy) = lm.forks(prompt, cont, [None, {}])
        slots = policy.budget
        logits = {"full": first, "policy": first}
        for i, token in enumerate(continuation):
            for name, decoder in (("full", full), ("policy", policy)):
                nll[name] -= float(_log_softmax(logits[name].astype(np.float64))[token])
            agree.append(int(np.argmax(logits["full"])) == int(np.argmax(logits["policy"])))
            if i + 1 < len(continuation):
                logits = {"full": full.step(token), "policy": policy.step(token)}
    count = len(windows) * cont
    ratio = float(np.exp((nll["policy"] - nll["full"]) / count))
    result = {"prompt_tokens": prompt_len, "continuation_tokens": cont, "prompts": int(len(windows)),
              "slots": slots, "evicts": slots < prompt_len + cont,
              "data": "held-out Wikipedia articles, concatenated (never the calibration articles)",
              "perplexity_full": float(np.exp(nll["full"] / count)), "perplexity_policy": float(np.exp(nll["policy"] / count)),
              "perplexity_ratio": ratio, "teacher_forced_agreement": float(np.mean(agree))}
    if cfg.max_kv_perplexity_ratio and ratio > cfg.max_kv_perplexity_ratio:
        result["failure"] = (f"under its KV policy the continuation's perplexity is {ratio:.3f}x the full cache's "
                             f"> max_kv_perplexity_ratio {cfg.max_kv_perplexity_ratio} (raise the budget)")
    return result
