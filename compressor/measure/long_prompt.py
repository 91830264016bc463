"""`compress bench`'s long-prompt rows for a language model compiled with a KV-cache policy (passes/kv_cache.py):
decode ms/token after prompts of 1k, 2k, 4k tokens and the longest the artifact holds, full cache against the
compiled policy, on the same graph and weights.

One full-attention prefill per length serves both (the policy's decoder is a fork of it, as an `exact` prefill
would leave it), and the two decoders step in turn so that load from other processes hits both alike. The text is
Python's own library reference (pydoc_data, in every Python): long, real prose and code, present on any machine.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from compressor.errors import UsageError

STEPS, WARMUP = 24, 2  # timed and untimed decode steps per decoder


def reference_text_ids(lm, tokens: int) -> list[int]:
    """At least `tokens` token ids of Python's library reference (repeated if a tokenizer packs it tighter)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = lm.encode(text, add_special_tokens=False)
    while len(ids) < tokens:
        ids = ids + ids
    return ids[:tokens]


def parse_lengths(spec: str, max_length: int, steps: int) -> list[int]:
    """"1024,2048,4096,max" -> prompt lengths; max = the longest prompt that still leaves room for the steps."""
    longest = max_length - steps - WARMUP - 2
    out = []
    for part in spec.split(","):
        part = part.strip()
        n = longest if part == "max" else int(part) if part.isdigit() else None
        if n is None or not 16 <= n <= longest:
            raise UsageError(f"--long-prompts takes lengths from 16 to {longest} (this artifact's max_length "
                             f"{max_length} less the decode steps) or 'max', comma separated; got {part!r}")
        if n not in out:
            out.append(n)
    return out


def long_prompt_rows(lm, lengths: list[int], steps: int = STEPS, warmup: int = WARMUP, step=lambda msg: None) -> list[dict]:
    """Per prompt length: prefill seconds, then decode ms/token (median of `steps`) for the full cache and the
    compiled policy, their ratio, and the KV bytes each holds while decoding."""
    if lm.kv_policy is None:
        raise UsageError("long-prompt rows compare the compiled KV policy with the full cache; this artifact has no "
                         "policy (compile it with the kv_cache pass)")
    name = lm.kv_policy["policy"]
    ids = reference_text_ids(lm, max(lengths))
    rows = []
    for n in lengths:
        step(f"long prompt: prefill of {n} tokens")
        t0 = time.perf_counter()
        logits, (full, policy) = lm.forks(ids[:n], steps + warmup + 1, [None, {}])
        prefill_s = time.perf_counter() - t0
        decoders = {"full": full, "policy": policy}
        last = {k: logits for k in decoders}
        times = {k: [] for k in decoders}
        step(f"long prompt: {steps} decode steps after {n} tokens, full cache and {name} in turn")
        for i in range(steps + warmup):
            for k, d in decoders.items():
                token = int(np.argmax(last[k]))
                t0 = time.perf_counter()
                last[k] = d.step(token)
                if i >= warmup:
                    times[k].append(1e3 * (time.perf_counter() - t0))
        full_ms, policy_ms = (statistics.median(times[k]) for k in ("full", "policy"))
        rows.append({"prompt": n, "prefill_s": prefill_s, "full_ms": full_ms, "policy_ms": policy_ms,
                     "speedup": full_ms / policy_ms, "slots": policy.budget,
                     "full_kv_mb": full.buf.nbytes / 2**20, "policy_kv_mb": policy.buf.nbytes / 2**20})
    return rows
