"""KV-cache budgets on SmolLM2-135M (4-bit), and on Gemma 3 270M (4-bit): decode speed, memory and quality against
the full cache.

What it measures, on long real text (the Vim user manual and Python's library reference topics, tokenized with the
artifact's tokenizer):

1. Speed (SmolLM2): decode ms/token at prompts of 2k, 4k and ~8k tokens (8192 less the decoded tokens: the artifacts
   hold 8192 positions), measured round-robin so background load hits every configuration alike: 10 turns of 5 steps
   of each decoder, after 2 warm-up steps; the first step of each turn is not timed (the first step after another
   onnxruntime session's pays for waking this session's threads), so 40 timed steps (median, p25, p75): the twin
   without the pass (/tmp/kv-full, full cache, SharedKVDecoder), the h2o graph with its full cache, the window graph
   at 512 and 1024 slots, the h2o graph under h2o and under snapkv at 512 and 1024. Prefill seconds for each.
   Speed-up = twin ms / policy ms. Prompts start at token 2000 of the Vim manual.
2. Memory: each decoder's KV bytes (after prefill, after decoding) and, at 4k, the peak RSS (VmHWM) of a fresh
   process that loads the model, prefills and decodes 64 tokens, against a process that only loads the model; the
   generation's own peak is read with the peak counter reset after loading.
3. Quality against the full cache of the same graph, for each policy (window, h2o, snapkv) at 10/25/50% of the
   prompt (25/50% at 4k, where 10% sits next to 512) and at 512/1024 slots, prompts of 2k tokens (one per document,
   at token 2000; 1k too with --quality-lengths 1024,2048,4096) and 4k tokens (three per document, at tokens 2000,
   40000 and 80000: six prompts): perplexity of the document's next 256 tokens
   (teacher forced, one token at a time through the policy decoder), teacher-forced argmax agreement (the fraction of
   those 256 positions where the policy's argmax equals the full cache's, both fed the true tokens), greedy agreement
   over 64 tokens (fraction of positions where the policy's free-running greedy token equals the full cache's, and
   the matching prefix), and pass-key retrieval (a random 5-digit key hidden at depths 10/30/50/70/90% of filler
   text, asked for at the end; 8 greedy tokens; success if the key appears) at 2k and 4k tokens.
   One full-attention prefill per prompt (`feed_prompt`) is forked into the full cache and every policy x budget
   (`PolicyDecoder.fork`), so every configuration starts from the same exact prefill.
   Noise floor: the twin (/tmp/kv-full) on the same prompt, greedy and teacher forced, against the h2o graph's full
   cache (two equivalent full caches, not bit-identical): the row `full (h2o graph) vs twin`. At each position the
   top-1 over top-2 logit margins are kept, to tell near-tie flips from real disagreement.
4. Gemma 3 270M (/tmp/kv-gemma3, window graph, 5 of 6 layers sliding-window over 512 slots, so window budgets below
   512 only): at 2k and 4k tokens of the Vim manual (token 2000 on, after Gemma's <bos>), decode ms/token of the full
   cache (same graph) vs window 256 and 508 (round-robin as above), quality of window 256 and 508 against the full
   cache, and pass-key (5 trials) at 4k; beside them, window 508 with <bos> the only sink (sinks = 1), a diagnostic.

Targets (examples/smollm2-kv.toml: snapkv, 1024 slots), reported for snapkv, h2o and window at 512 and 1024 slots: a
4k prompt decodes >= 2x faster than the full-cache twin, greedy agreement >= 0.75 over 64 tokens at 4k (read beside
its noise floor), pass-key successes >= the full cache's minus one trial in five; teacher-forced agreement and the
perplexity ratio at 4k are reported beside them.

Reproduce, from the repository root (about 25 minutes on 2 cores after the four builds; the h2o graph's compiled
policy does not matter, every policy here is an override or a fork):

    compress run examples/smollm2-kv.toml --output /tmp/kv-h2o
    compress run examples/smollm2-kv-window.toml --output /tmp/kv-window
    compress run examples/smollm2-kv-full.toml --output /tmp/kv-full
    compress run examples/gemma3-kv.toml --output /tmp/kv-gemma3
    python benchmarks/kv_cache.py            # writes benchmarks/kv_cache.{json,md,png}
    python benchmarks/kv_cache.py --quick    # a ~5 minute smoke of every section, written under /tmp/kv_cache_quick.*
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxruntime as ort  # noqa: E402

from compressor.runtime import load  # noqa: E402
from compressor.runtime.decode import SharedKVDecoder  # noqa: E402
from compressor.runtime.kv_policy import KVBudget  # noqa: E402

POLICIES = ("window", "h2o", "snapkv")
OFFSET = 2000          # the first prompt of each document starts here (past its header)
OFFSETS_4K = (2000, 40000, 80000)  # three prompts per document at 4k
CONTINUATION = 256     # teacher-forced tokens after the prompt
GREEDY = 64            # free-running greedy tokens compared with the full cache
FRACTIONS = (0.10, 0.25, 0.50)
FRACTIONS_4K = (0.25, 0.50)  # at 4k, 10% (410 slots) sits next to the 512-slot row: dropped to fit six prompts
SLOTS = (512, 1024)
SINKS, RECENT = 4, None  # recent None: h2o keeps half its budget recent, snapkv observes 32 tokens
TARGETS = (("snapkv", 512), ("snapkv", 1024), ("h2o", 512), ("h2o", 1024), ("window", 512), ("window", 1024))
GEMMA_SLOTS = (256, 508)  # below Gemma 3's 512-slot sliding window
THREADS = 2
# decode timing: ROUNDS turns of BLOCK steps per decoder, after WARMUP steps; the first step of each turn is not timed
# (after another session's step it pays for waking this session's threads: +15-20 ms measured on this machine)
ROUNDS, BLOCK, WARMUP = 10, 5, 2
STEPS = ROUNDS * (BLOCK - 1)  # timed steps per decoder
MEMORY_STEPS = 64
MAX_POSITIONS = 8192   # the artifacts' max_length: an "8k" prompt leaves room for the decoded tokens
PASSKEY_NEW = 8
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


# ---- inputs ----------------------------------------------------------------------------------------------------------
def documents() -> dict[str, str]:
    """Long real text found on this machine: the Vim user manual (vim-runtime) and Python's library reference."""
    from pydoc_data.topics import topics
    docs = {}
    vim = sorted(glob.glob("/usr/share/vim/vim*/doc/usr_[0-9][0-9].txt"))
    if vim:
        docs["vim user manual"] = "\n".join(Path(p).read_text(errors="replace") for p in vim)
    docs["python library reference (pydoc topics)"] = "\n\n".join(topics[k] for k in sorted(topics))
    return docs


def passkey_prompt(m, n: int, depth: float, key: int) -> list[int]:
    """At most n tokens: the intro, filler with the needle after `depth` of it, the question."""
    def ids(units: int) -> list[int]:
        cut = round(depth * units)
        text = (PASSKEY_INTRO + PASSKEY_FILLER * cut + PASSKEY_NEEDLE.format(key=key) + PASSKEY_FILLER * (units - cut)
                + PASSKEY_QUESTION)
        return m.encode(text)
    per_unit = len(m.encode(PASSKEY_FILLER * 10)) / 10
    units = int((n - len(ids(0))) / per_unit)
    while len(ids(units)) > n:
        units -= 1
    while len(ids(units + 1)) <= n:
        units += 1
    return ids(units)


def budget(policy: str, slots: int, sinks: int = SINKS) -> KVBudget:
    return KVBudget(policy, int(slots), sinks=sinks, recent=RECENT)


def full_cache(n: int, new: int) -> KVBudget:
    """A budget that never evicts: the full cache on the same graph and code path."""
    return KVBudget("window", n + new + 2, sinks=0)


def budget_grid(n: int, fractions, slots) -> list[tuple[str, int, list[str]]]:
    """(policy, slots, labels): each policy at fractions of the prompt and at fixed slot counts below the prompt's
    length, one entry per distinct slot count (e.g. 25% of 4096 = 1024 slots)."""
    grid: dict[tuple[str, int], list[str]] = {}
    for policy in POLICIES:
        for f in fractions:
            grid.setdefault((policy, round(f * n)), []).append(f"{round(f * 100)}%")
        for s in slots:
            if s < n:
                grid.setdefault((policy, s), []).append(str(s))
    order = sorted(grid, key=lambda key: (POLICIES.index(key[0]), key[1]))
    return [(p, s, grid[p, s]) for p, s in order]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def prefilled(m, prompt: list[int], new: int):
    """The prompt through the graph once with full attention (kept scores for every policy): (decoder, logits)."""
    m.kv_policy = None
    parent = m.policy_decoder(len(prompt), new)
    logits = parent.feed_prompt(prompt, m.policy_chunk).copy()
    return parent, logits


def forked(parent, policy: KVBudget):
    f = parent.fork(policy)
    f.finish_prefill()
    return f


# ---- quality ---------------------------------------------------------------------------------------------------------
def margin(logits: np.ndarray) -> float:
    top2 = np.partition(logits, -2)[-2:]
    return float(top2[1] - top2[0])


def teacher_run(step, first: np.ndarray, cont: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-log p of each continuation token, the argmax at each position and its margin over the second logit, the
    true tokens fed one at a time."""
    nll, top, mar, logits = np.empty(len(cont)), np.empty(len(cont), np.int64), np.empty(len(cont)), first
    for i, t in enumerate(cont):
        nll[i] = -log_softmax(logits)[t]
        top[i], mar[i] = int(np.argmax(logits)), margin(logits)
        if i + 1 < len(cont):
            logits = step(int(t))
    return nll, top, mar


def greedy_run(step, first: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    """k free-running greedy tokens and, at each, the margin of the top logit over the second."""
    tokens, margins, logits = [], [], first
    for i in range(k):
        tokens.append(int(np.argmax(logits)))
        margins.append(margin(logits))
        if i + 1 < k:
            logits = step(tokens[-1])
    return tokens, margins


# the calls benchmarks/kv_cache_example.py makes (it imports this module)
def teacher_forced(parent, policy: KVBudget, first: np.ndarray, cont: list[int]) -> tuple[np.ndarray, object]:
    """-log p of each continuation token under a fork of `parent`, and the fork."""
    d = forked(parent, policy)
    return teacher_run(d.step, first, cont)[0], d


def greedy(parent, policy: KVBudget, first: np.ndarray, k: int) -> list[int]:
    """k free-running greedy tokens under a fork of `parent`."""
    return greedy_run(forked(parent, policy).step, first, k)[0]


def agreement(a: list[int], b: list[int]) -> tuple[float, int]:
    same = [x == y for x, y in zip(a, b)]
    prefix = same.index(False) if False in same else len(same)
    return float(np.mean(same)), prefix


def compare(name: dict, nll, top, tokens, margins, ref: dict) -> dict:
    """One configuration against the full cache's teacher-forced NLL and argmaxes and greedy tokens; at the first
    greedy divergence, both streams' top-1 over top-2 logit margins (a near tie flips on tiny differences)."""
    agree, prefix = agreement(tokens, ref["tokens"])
    differ = top != ref["top"]
    return {**name, "nll": float(nll.mean()), "ppl": float(np.exp(nll.mean())),
            "ppl_ratio": float(np.exp(nll.mean() - ref["nll"].mean())),
            "teacher_forced_agreement": float(np.mean(~differ)),
            # where the teacher-forced argmaxes differ: the full cache's own top-1 over top-2 margin there
            "tf_disagreement_margin_full_median": float(np.median(ref["tf_margins"][differ])) if differ.any() else None,
            "tf_margin_full_median": float(np.median(ref["tf_margins"])),
            "greedy_agreement": agree, "greedy_prefix": prefix,
            "divergence_margin_full": ref["margins"][prefix] if prefix < len(tokens) else None,
            "divergence_margin_config": margins[prefix] if prefix < len(tokens) else None}


def twin_reference(m, prompt: list[int], cont: list[int], k: int) -> tuple[np.ndarray, np.ndarray, list, list]:
    """The twin (no pass, SharedKVDecoder) on one prompt: greedy, then (rewound to the prompt: the rows past its
    length are masked and overwritten) teacher forced."""
    d = SharedKVDecoder(m.session, m._kv_per_block, m.head_dim, 1, len(prompt) + len(cont) + k + 2)
    first = d.prefill([prompt], m.prefill_chunk)[0].copy()
    step = lambda tok: d.step(np.array([tok], np.int64))[0]  # noqa: E731
    at_prompt = d.lengths.copy()
    tokens, margins = greedy_run(step, first, k)
    d.lengths = at_prompt.copy()
    nll, top, _ = teacher_run(step, first, cont)
    return nll, top, tokens, margins


def quality(m, twin, doc: str, ids: list[int], n: int, offset: int, grid=None, prefix_ids=(), pre=None) -> list[dict]:
    """Perplexity ratio, teacher-forced and greedy agreement of every policy x budget against the full cache of the
    same graph, one prompt; with `twin`, the twin's against it (the noise floor). `pre`: the prompt's (parent, first
    logits) when already prefilled (for CONTINUATION + GREEDY new tokens)."""
    prefix_ids = list(prefix_ids)
    prompt = prefix_ids + ids[offset + len(prefix_ids):offset + n]
    cont = ids[offset + n:offset + n + CONTINUATION]
    t = time.perf_counter()
    parent, first = pre or prefilled(m, prompt, CONTINUATION + GREEDY)
    del pre
    log(f"quality {doc[:10]} n={n} @{offset}: prefill {time.perf_counter() - t:.1f}s")
    full = full_cache(n, CONTINUATION + GREEDY)
    nll_full, top_full, tf_margins = teacher_run(forked(parent, full).step, first, cont)
    tokens, margins = greedy_run(forked(parent, full).step, first, GREEDY)
    ref = {"nll": nll_full, "top": top_full, "tokens": tokens, "margins": margins, "tf_margins": tf_margins}
    where = {"doc": doc, "offset": offset, "prompt": n}
    rows = [{**where, "policy": "full", "slots": n, "labels": ["full"], "nll": float(nll_full.mean()),
             "ppl": float(np.exp(nll_full.mean())), "ppl_ratio": 1.0, "teacher_forced_agreement": 1.0,
             "greedy_agreement": 1.0, "greedy_prefix": GREEDY, "greedy_tokens": tokens}]
    if twin is not None:
        t = time.perf_counter()
        nll, top, tw_tokens, tw_margins = twin_reference(twin, prompt, cont, GREEDY)
        rows.append(compare({**where, "policy": "twin", "slots": n, "labels": ["full (h2o graph) vs twin"]},
                            nll, top, tw_tokens, tw_margins, ref))
        r = rows[-1]
        r["greedy_tokens"] = tw_tokens
        log(f"  twin vs full: ppl ratio {r['ppl_ratio']:.4f}, teacher-forced {r['teacher_forced_agreement']:.3f}, "
            f"greedy {r['greedy_agreement']:.2f} (prefix {r['greedy_prefix']}, margins there "
            f"{fmt(r['divergence_margin_full'], '.3f')}/{fmt(r['divergence_margin_config'], '.3f')}) "
            f"[{time.perf_counter() - t:.1f}s]")
    if grid is None:
        grid = budget_grid(n, FRACTIONS_4K if n >= 4096 else FRACTIONS, SLOTS)
    for policy, slots, labels, *rest in grid:
        sinks = rest[0] if rest else SINKS
        t = time.perf_counter()
        d = forked(parent, budget(policy, slots, sinks))
        nll, top, _ = teacher_run(d.step, first, cont)
        tok, mar = greedy_run(forked(parent, budget(policy, slots, sinks)).step, first, GREEDY)
        rows.append({**compare({**where, "policy": policy, "slots": slots, "sinks": sinks, "labels": labels},
                               nll, top, tok, mar, ref),
                     "resident_rows": int(d.L), "kv_bytes": int(d.kv_bytes)})
        r = rows[-1]
        log(f"  {policy:6} {slots:5} ({'/'.join(labels)}): ppl ratio {r['ppl_ratio']:.3f}, teacher-forced "
            f"{r['teacher_forced_agreement']:.3f}, greedy {r['greedy_agreement']:.2f} (prefix {r['greedy_prefix']}) "
            f"[{time.perf_counter() - t:.1f}s]")
    del parent
    gc.collect()
    return rows


def passkey(m, lengths, trials: int, configs_at=None) -> tuple[list[dict], list[dict]]:
    """Successes out of `trials` per configuration and length; the per-trial outputs."""
    depths = [(i + 0.5) / trials for i in range(trials)]
    summary, details = {}, []
    for n in lengths:
        keys = np.random.default_rng([20240, n]).integers(10000, 100000, trials)
        configs = [("full", n, ["full"])] + (configs_at(n) if configs_at else budget_grid(n, (0.25, 0.50), SLOTS))
        for depth, key in zip(depths, keys):
            prompt = passkey_prompt(m, n, depth, int(key))
            t = time.perf_counter()
            parent, first = prefilled(m, prompt, PASSKEY_NEW)
            answers = {}
            for policy, slots, labels, *rest in configs:
                sinks = rest[0] if rest else SINKS
                pol = full_cache(len(prompt), PASSKEY_NEW) if policy == "full" else budget(policy, slots, sinks)
                text = m.decode(greedy_run(forked(parent, pol).step, first, PASSKEY_NEW)[0])
                ok = str(int(key)) in text
                row = summary.setdefault((n, policy, slots, sinks), {
                    "prompt": n, "policy": policy, "slots": slots, "sinks": sinks, "labels": labels, "successes": 0,
                    "trials": 0})
                row["successes"] += ok
                row["trials"] += 1
                answers[f"{policy} {slots}" + ("" if sinks == SINKS else f" sinks {sinks}")] = [text, ok]
            details.append({"prompt": n, "prompt_tokens": len(prompt), "depth": depth, "key": int(key),
                            "answers": answers})
            hits = sum(ok for _, ok in answers.values())
            log(f"pass-key n={n} depth={depth:.2f} key={key}: full -> {answers[f'full {n}'][0]!r}; "
                f"{hits}/{len(answers)} configs found it [{time.perf_counter() - t:.1f}s]")
            del parent
            gc.collect()
    return list(summary.values()), details


# ---- speed -----------------------------------------------------------------------------------------------------------
class Timed:
    """One decoder in the round-robin: its step function, last logits, step times and tokens."""

    def __init__(self, name, step, logits, decoder, prefill_s, kv_bytes):
        self.name, self.step, self.logits, self.decoder, self.prefill_s = name, step, logits, decoder, prefill_s
        self.first, self.kv_bytes_prefill, self.times, self.tokens = logits, kv_bytes, [], []


def twin_decoder(m, prompt: list[int], new: int) -> Timed:
    d = SharedKVDecoder(m.session, m._kv_per_block, m.head_dim, 1, len(prompt) + new)
    t = time.perf_counter()
    first = d.prefill([prompt], m.prefill_chunk)[0].copy()
    return Timed("twin, full cache", lambda tok: d.step(np.array([tok], np.int64))[0], first, d,
                 time.perf_counter() - t, sum(b.nbytes for b in d._buffers))


def policy_decoders(m, graph: str, prompt: list[int], new: int, configs) -> list[Timed]:
    """One timed full-attention prefill on this graph, forked into each (name, budget); a fork's prefill time is the
    shared prompt pass plus its own compaction."""
    t = time.perf_counter()
    parent, first = prefilled(m, prompt, new)
    feed = time.perf_counter() - t
    out = []
    for name, pol in configs:
        f = parent.fork(pol)
        t = time.perf_counter()
        f.finish_prefill()
        out.append(Timed(name, f.step, first, f, feed + time.perf_counter() - t, f.kv_bytes))
    log(f"  {graph} graph prefill {feed:.1f}s")
    return out


def round_robin(decs: list[Timed], n: int, key: str = "speedup_vs_twin") -> list[dict]:
    """Decode every decoder round-robin (see the docstring); rows with ms/token and the speed-up over decs[0]."""
    gc.collect()
    for turn in range(1 + ROUNDS):  # turn 0: the warm-up steps
        for r in decs:
            for j in range(WARMUP if turn == 0 else BLOCK):
                tok = int(np.argmax(r.logits))
                t = time.perf_counter()
                r.logits = r.step(tok)
                if turn and j:
                    r.times.append(time.perf_counter() - t)
                r.tokens.append(tok)
    base = decs[0]
    base_ms = float(np.median(base.times)) * 1e3
    rows = []
    for r in decs:
        ms = np.array(r.times) * 1e3
        d = r.decoder
        row = {"prompt": n, "config": r.name, "ms_median": float(np.median(ms)), "ms_p25": float(np.percentile(ms, 25)),
               "ms_p75": float(np.percentile(ms, 75)), key: base_ms / float(np.median(ms)),
               "prefill_s": r.prefill_s, "kv_bytes_prefill": int(r.kv_bytes_prefill)}
        if isinstance(d, SharedKVDecoder):
            row.update(resident_rows=int(d.lengths[0]), kv_bytes_steady=int(sum(b.nbytes for b in d._buffers)))
        else:
            row.update(resident_rows=int(d.L), kv_bytes_steady=int(d.kv_bytes), budget_slots=int(d.budget))
        row[f"greedy_agreement_with_{base.name.split(',')[0].replace(' ', '_')}"] = agreement(r.tokens, base.tokens)[0]
        row["load_average"] = os.getloadavg()[0]
        rows.append(row)
        log(f"  {r.name:22} {row['ms_median']:6.1f} ms/token ({row['ms_p25']:.1f}-{row['ms_p75']:.1f}), "
            f"x{row[key]:.2f}, prefill {r.prefill_s:.1f}s, resident {row['resident_rows']}")
    return rows


def speed_at(models: dict, ids: list[int], n: int) -> list[dict]:
    prompt, new = ids[OFFSET:OFFSET + n], ROUNDS * BLOCK + WARMUP + 2
    decs = [twin_decoder(models["full"], prompt, new)]
    log(f"speed n={n}: twin prefill {decs[0].prefill_s:.1f}s")
    decs += policy_decoders(models["h2o"], "h2o", prompt, new, [
        ("h2o graph, full cache", full_cache(n, new)),
        *((f"{p} {s}", budget(p, s)) for p in ("h2o", "snapkv") for s in SLOTS)])
    decs += policy_decoders(models["window"], "window", prompt, new,
                            [(f"window {s}", budget("window", s)) for s in SLOTS])
    rows = round_robin(decs, n)
    # the same model with a full cache on both graphs: the first logits (prefill chunks of 256 vs 64) should agree
    rows[1]["first_logits_maxdiff_vs_twin"] = float(np.abs(decs[0].first - decs[1].first).max())
    del decs
    gc.collect()
    return rows


# ---- Gemma 3 (a second family: window only, below its 512-slot sliding window) ----------------------------------------
def gemma(m, doc: str, ids: list[int], lengths, passkey_n: int, trials: int) -> dict:
    """On one graph: the full cache (a never-evicting fork) vs window at GEMMA_SLOTS, speed round-robin and quality
    from one exact prefill per length; pass-key at passkey_n. Prompts start with Gemma's <bos>, then the document
    from token OFFSET + 1 on."""
    bos = m._pre.get("bos_token_id")
    prefix = [] if bos is None else [int(bos)]
    grid = [("window", s, [str(s)]) for s in GEMMA_SLOTS]
    # a diagnostic beside the brief's rows: the sinks are kept in the sliding-window layers too, where the model never
    # attends beyond 512 positions; with <bos> the only sink (sinks = 1) the three mid-text "sinks" are not kept
    diag = [("window", max(GEMMA_SLOTS), [f"{max(GEMMA_SLOTS)}, sinks 1"], 1)]
    out = {"speed": [], "quality": [], "passkey": [], "passkey_trials": [], "bos": bos}
    for n in lengths:
        prompt = prefix + ids[OFFSET + len(prefix):OFFSET + n]
        new = ROUNDS * BLOCK + WARMUP + 2
        t = time.perf_counter()
        parent, first = prefilled(m, prompt, max(new, CONTINUATION + GREEDY))  # shared by speed and quality
        feed = time.perf_counter() - t
        decs = []
        for name, pol in [("full cache", full_cache(n, new))] + [(f"window {s}", budget("window", s))
                                                                  for s in GEMMA_SLOTS]:
            f = parent.fork(pol)
            t = time.perf_counter()
            f.finish_prefill()
            decs.append(Timed(name, f.step, first, f, feed + time.perf_counter() - t, f.kv_bytes))
        log(f"gemma speed n={n}: prefill {feed:.1f}s")
        out["speed"] += round_robin(decs, n, key="speedup_vs_full")
        del decs
        gc.collect()
        out["quality"] += quality(m, None, doc, ids, n, OFFSET, grid=grid + diag, prefix_ids=prefix,
                                  pre=(parent, first))
        del parent
        gc.collect()
    out["passkey"], out["passkey_trials"] = passkey(m, (passkey_n,), trials, configs_at=lambda n: grid + diag)
    return out


# ---- memory (fresh processes) ----------------------------------------------------------------------------------------
def status_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process. Not ru_maxrss: Linux carries it across exec, so a child started
    from this (large) benchmark process would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so that the next peak is the generation's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_child(spec: dict) -> dict:
    """Run in a fresh process: load, then (unless mode is "load") prefill and decode; report the peak RSS."""
    m = load(spec["artifact"], threads=THREADS)
    prompt = np.load(spec["ids"]).tolist()
    gc.collect()
    out = {"mode": spec["mode"], "load_peak_bytes": status_bytes("VmHWM"),
           "rss_after_load_bytes": status_bytes("VmRSS")}
    if spec["mode"] == "load":
        return out
    out["peak_reset"] = reset_peak()
    n, steps = len(prompt), MEMORY_STEPS
    t = time.perf_counter()
    if spec["mode"] == "twin":
        d = SharedKVDecoder(m.session, m._kv_per_block, m.head_dim, 1, n + steps + 1)
        logits = d.prefill([prompt], m.prefill_chunk)[0]
        kv_bytes = lambda: sum(b.nbytes for b in d._buffers)  # noqa: E731
        step = lambda tok: d.step(np.array([tok], np.int64))[0]  # noqa: E731
    else:
        m.kv_policy = spec["policy"]
        d = m.policy_decoder(n, steps)
        logits = d.prefill(prompt, m.policy_chunk)
        kv_bytes, step = (lambda: d.kv_bytes), d.step
    out.update(prefill_s=time.perf_counter() - t, kv_bytes_prefill=kv_bytes())
    for _ in range(steps):
        logits = step(int(np.argmax(logits)))
    out.update(kv_bytes_steady=kv_bytes(), generation_peak_bytes=status_bytes("VmHWM"))
    out["peak_rows"] = d.peak_rows if spec["mode"] != "twin" else d.max_length
    out["resident_rows"] = int(d.L) if spec["mode"] != "twin" else int(d.lengths[0])
    return out


def spawn(spec: dict) -> dict:
    res = subprocess.run([sys.executable, __file__, "--rss-child", json.dumps(spec)], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"memory child {spec} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def memory(folders: dict, ids: list[int], n: int) -> list[dict]:
    """Peak RSS of a fresh process per configuration: the process's own peak, that of a process that only loads the
    same artifact, and the generation's own (peak after load, with the peak counter reset, less the RSS after load)."""
    configs = [("twin, full cache", "full", "twin", None),
               ("window 512 (exact prefill)", "window", "policy", {"policy": "window", "budget": 512}),
               ("window 512 (stream prefill)", "window", "policy", {"policy": "window", "budget": 512,
                                                                     "prefill": "stream"}),
               ("h2o 512 (exact prefill)", "h2o", "policy", {"policy": "h2o", "budget": 512, "recent": RECENT}),
               ("snapkv 1024 (exact prefill)", "h2o", "policy", {"policy": "snapkv", "budget": 1024,
                                                                  "recent": RECENT})]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ids.npy")
        np.save(path, np.array(ids[OFFSET:OFFSET + n], np.int64))
        base = {k: spawn({"artifact": str(folders[k]), "ids": path, "mode": "load"})
                for k in dict.fromkeys(c[1] for c in configs)}
        for name, artifact, mode, policy in configs:
            r = spawn({"artifact": str(folders[artifact]), "ids": path, "mode": mode, "policy": policy})
            after_load = r["rss_after_load_bytes"] if r["peak_reset"] else base[artifact]["load_peak_bytes"]
            own = r["generation_peak_bytes"] - after_load
            r.update(config=name, prompt=n, artifact=str(folders[artifact]),
                     peak_rss_bytes=max(r["load_peak_bytes"], r["generation_peak_bytes"]),
                     load_only_peak_bytes=base[artifact]["load_peak_bytes"],
                     load_only_rss_bytes=base[artifact]["rss_after_load_bytes"], generation_rss_bytes=own)
            rows.append(r)
            log(f"memory n={n} {name}: peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB (load only "
                f"{r['load_only_peak_bytes'] / 2**20:.0f}), generation's own {own / 2**20:.0f} MiB, KV "
                f"{r['kv_bytes_prefill'] / 2**20:.1f} -> {r['kv_bytes_steady'] / 2**20:.1f} MiB")
    return rows


# ---- summaries -------------------------------------------------------------------------------------------------------
METRICS = ("ppl_ratio", "teacher_forced_agreement", "greedy_agreement", "greedy_prefix")


def quality_means(rows: list[dict]) -> list[dict]:
    """Each (prompt, policy, slots) averaged over its prompts (documents x offsets), with the per-prompt values."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["prompt"], r["policy"], r["slots"], r.get("sinks")), []).append(r)
    out = []
    for (n, p, s, k), g in groups.items():
        row = {"prompt": n, "policy": p, "slots": s, "sinks": k, "labels": g[0]["labels"], "prompts": len(g),
               "per_prompt": [{"doc": r["doc"], "offset": r["offset"], **{k: r[k] for k in METRICS}} for r in g]}
        for k in METRICS:
            row[k] = float(np.mean([r[k] for r in g]))
            row[k + "_range"] = [float(min(r[k] for r in g)), float(max(r[k] for r in g))]
        if p == "full":
            row["ppl_per_prompt"] = [r["ppl"] for r in g]
        out.append(row)
    return out


def find(rows: list[dict], **where) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in where.items())), None)


def check(value, bar, at_least=True) -> dict:
    met = None if value is None else bool(value >= bar if at_least else value <= bar)
    return {"value": value, "bar": bar, "met": met}


def targets(speed: list[dict], means: list[dict], keys: list[dict], n_target: int) -> dict:
    """The issue's three checks for each of TARGETS (examples/smollm2-kv.toml is snapkv 1024): speed-up over the
    twin, greedy agreement (mean over prompts, beside its noise floor: the twin against the h2o graph's full cache)
    and pass-key successes; teacher-forced agreement and the perplexity ratio beside them."""
    out = {}
    n_speed = n_target if find(speed, prompt=n_target) else max(r["prompt"] for r in speed)
    n_quality = n_target if find(means, prompt=n_target) else max(r["prompt"] for r in means)
    floor = find(means, prompt=n_quality, policy="twin")
    for policy, slots in TARGETS:
        sp = find(speed, prompt=n_speed, config=f"{policy} {slots}")
        q = find(means, prompt=n_quality, policy=policy, slots=slots)
        pk, ok = {}, []
        for n in sorted({r["prompt"] for r in keys}):
            full, mine = find(keys, prompt=n, policy="full"), find(keys, prompt=n, policy=policy, slots=slots)
            if mine is None:
                continue
            bar = full["successes"] - mine["trials"] / 5
            pk[str(n)] = {"successes": mine["successes"], "full_successes": full["successes"],
                          "trials": mine["trials"], "bar": bar}
            ok.append(mine["successes"] >= bar)
        per = (lambda k: [{"doc": r["doc"], "offset": r["offset"], "value": r[k]} for r in q["per_prompt"]]) \
            if q else (lambda k: None)
        t = {"policy": policy, "slots": slots,
             "speedup_vs_twin": {"prompt": n_speed, **check(sp and sp["speedup_vs_twin"], 2.0)},
             "greedy_agreement": {"prompt": n_quality, "prompts": q and q["prompts"],
                                  "noise_floor": floor and floor["greedy_agreement"],
                                  "noise_floor_per_prompt": floor and [r["greedy_agreement"]
                                                                       for r in floor["per_prompt"]],
                                  "per_prompt": per("greedy_agreement"),
                                  **check(q and q["greedy_agreement"], 0.75)},
             "teacher_forced_agreement": {"prompt": n_quality, "value": q and q["teacher_forced_agreement"],
                                          "noise_floor": floor and floor["teacher_forced_agreement"],
                                          "per_prompt": per("teacher_forced_agreement")},
             "ppl_ratio": {"prompt": n_quality, "value": q and q["ppl_ratio"], "per_prompt": per("ppl_ratio"),
                           "noise_floor": floor and floor["ppl_ratio"]},
             "passkey": {"per_prompt": pk, "bar": "full cache's successes minus one trial in five",
                         "met": bool(all(ok)) if ok else None}}
        checks = [t["speedup_vs_twin"]["met"], t["greedy_agreement"]["met"], t["passkey"]["met"]]
        t["met"] = None if None in checks else all(checks)
        out[f"{policy}@{slots}"] = t
    return out


# ---- report ----------------------------------------------------------------------------------------------------------
def mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def rng(r: dict, k: str, spec: str) -> str:
    """mean [min-max] over prompts (just the value for one prompt)."""
    lo, hi = r[k + "_range"]
    return format(r[k], spec) if r["prompts"] == 1 else f"{r[k]:{spec}} [{lo:{spec}}-{hi:{spec}}]"


def _met(v) -> str:
    return "n/a" if v is None else ("met" if v else "not met")


def quality_table(means: list[dict], rows: list[dict]) -> list[str]:
    lines = ["| prompt | configuration | slots | prompts | ppl ratio | teacher-forced agreement | greedy agreement | "
             "matching prefix |", "|---|---|---|---|---|---|---|---|"]
    for r in means:
        if r["policy"] == "full":
            ppl = ", ".join(f"{v:.2f}" for v in r["ppl_per_prompt"])
            lines.append(f"| {r['prompt']} | full cache | {r['prompt']} | {r['prompts']} | ppl {ppl} | 1 | 1 | "
                         f"{GREEDY} |")
            continue
        name = "full (h2o graph) vs twin" if r["policy"] == "twin" else r["policy"]
        slots = "all" if r["policy"] == "twin" else f"{r['slots']} ({'/'.join(r['labels'])})"
        lines.append(f"| {r['prompt']} | {name} | {slots} | {r['prompts']} | {rng(r, 'ppl_ratio', '.3f')} | "
                     f"{rng(r, 'teacher_forced_agreement', '.3f')} | {rng(r, 'greedy_agreement', '.2f')} | "
                     f"{rng(r, 'greedy_prefix', '.1f')} |")
    return lines


def passkey_table(keys: list[dict]) -> list[str]:
    prompts = sorted({r["prompt"] for r in keys})
    lines = ["| policy | slots | " + " | ".join(f"{n} tokens" for n in prompts) + " |",
             "|---|---|" + "---|" * len(prompts)]
    for policy, slots, sinks in dict.fromkeys((r["policy"], r["slots"] if r["policy"] != "full" else "all",
                                               r.get("sinks")) for r in keys):
        cells = []
        for n in prompts:
            r = find(keys, prompt=n, policy=policy) if policy == "full" else \
                find(keys, prompt=n, policy=policy, slots=slots, sinks=sinks)
            cells.append("-" if r is None else f"{r['successes']}/{r['trials']} ({'/'.join(r['labels'])})")
        lines.append(f"| {policy} | {slots} | " + " | ".join(cells) + " |")
    return lines


def speed_table(rows: list[dict], key: str, base: str) -> list[str]:
    lines = [f"| prompt | configuration | ms/token | speed-up vs {base} | prefill s | resident rows | KV MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['prompt']} | {r['config']} | {r['ms_median']:.1f} ({r['ms_p25']:.1f}-{r['ms_p75']:.1f}) "
                     f"| {r[key]:.2f} | {r['prefill_s']:.1f} | {r['resident_rows']} | "
                     f"{mib(r['kv_bytes_prefill'])} -> {mib(r['kv_bytes_steady'])} |")
    return lines


def markdown(res: dict) -> str:
    m = res["meta"]
    secs = ", ".join(f"{k} {v / 60:.1f}" for k, v in m["sections_s"].items())
    lines = ["# KV-cache budgets on SmolLM2-135M and Gemma 3 270M (4-bit)", "",
             f"`{m['command']}` on {m['cpu']} ({m['cpus']} CPUs), {m['threads']} threads, onnxruntime "
             f"{m['onnxruntime']}, {m['runtime_s'] / 60:.1f} min (sections, min: {secs}). Documents: "
             + "; ".join(f"{d['name']} ({d['tokens']} SmolLM2 tokens)" for d in m["documents"])
             + ". Artifacts: " + ", ".join(f"{k} = `{v}`" for k, v in m["artifacts"].items())
             + f". Every policy runs with sinks = {SINKS} and recent = the runtime's default (h2o: half the budget; "
               "snapkv: a 32-token observation window).", ""]
    tq = next(iter(res["targets"].values()))
    lines += ["## Targets", "",
              f"At {tq['speedup_vs_twin']['prompt']} tokens: speed-up over the twin (full cache, no pass; bar 2.0), "
              f"greedy agreement over {GREEDY} tokens with the full cache (bar 0.75; mean over "
              f"{tq['greedy_agreement']['prompts']} prompts) beside its noise floor (the twin against the h2o graph's "
              f"full cache, two equivalent full caches), teacher-forced argmax agreement over {CONTINUATION} tokens "
              "(twin floor beside it), pass-key successes against the full cache's (bar: the full cache's less one "
              f"trial in five) and the perplexity ratio of the next {CONTINUATION} tokens. Met = the three bars "
              "(speed-up, greedy, pass-key). examples/smollm2-kv.toml is snapkv@1024.", "",
              "| config | speed-up at 4k | greedy at 4k (noise floor) | teacher-forced agreement at 4k (twin) | "
              "pass-key 2k / 4k (full) | ppl ratio at 4k | met? |", "|---|---|---|---|---|---|---|"]
    for name, t in res["targets"].items():
        s, g, tf, p, pr = (t["speedup_vs_twin"], t["greedy_agreement"], t["teacher_forced_agreement"], t["passkey"],
                           t["ppl_ratio"])
        pk = " / ".join(f"{v['successes']}/{v['trials']} ({v['full_successes']})" for v in p["per_prompt"].values())
        miss = [k for k, c in (("speed", s["met"]), ("greedy", g["met"]), ("pass-key", p["met"])) if c is False]
        lines.append(f"| {name} | {fmt(s['value'])} | {fmt(g['value'])} ({fmt(g['noise_floor'])}) | "
                     f"{fmt(tf['value'], '.3f')} ({fmt(tf['noise_floor'], '.3f')}) | {pk or '-'} | "
                     f"{fmt(pr['value'], '.3f')} | {_met(t['met'])}"
                     + (f" ({', '.join(miss)} not)" if miss else "") + " |")
    lines += ["", "## Decode speed (SmolLM2)", "",
              f"Median ms/token over {STEPS} steps per decoder, p25-p75 in brackets: {ROUNDS} round-robin turns of "
              f"{BLOCK} steps of each decoder after {WARMUP} warm-up steps, the first step of each turn untimed. "
              f"Prompts: the Vim manual from token {OFFSET}. Prefill: the twin in chunks of its prefill_chunk; a "
              "policy's = the graph's full-attention prompt pass plus its compaction (the fork trick, see Method). "
              "KV MiB: keys, values (and attention probabilities on the h2o graph) held after prefill -> after "
              "decoding.", ""]
    lines += speed_table(res["speed"], "speedup_vs_twin", "twin")
    lines += ["", f"## Memory (a fresh process per configuration: load, prefill, {MEMORY_STEPS} tokens decoded)", "",
              "Peak RSS = the process's VmHWM; load only = a process that only loads the same artifact; generation's "
              "own = the peak after load (VmHWM reset after loading) less the RSS after load. KV MiB = the decoder's "
              "keys, values and attention-probability buffers.", "",
              "| prompt | configuration | peak RSS MiB | load-only peak MiB | generation's own MiB | prefill s | "
              "KV MiB after prefill | KV MiB after decoding | peak rows |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["memory"]:
        lines.append(f"| {r['prompt']} | {r['config']} | {mib(r['peak_rss_bytes'])} | {mib(r['load_only_peak_bytes'])} "
                     f"| {mib(r['generation_rss_bytes'])} | {r['prefill_s']:.1f} | {mib(r['kv_bytes_prefill'])} | "
                     f"{mib(r['kv_bytes_steady'])} | {r['peak_rows']} |")
    offs = sorted({(r["prompt"], r["offset"]) for r in res["quality"]})
    by_n = {n: [o for k, o in offs if k == n] for n, _ in offs}
    lines += ["", "## Quality against the full cache (SmolLM2; mean over prompts, [min-max] over prompts)", "",
              "Prompts: each document at token offsets " + "; ".join(f"{n}: {', '.join(map(str, o))}"
                                                                  for n, o in by_n.items())
              + f". ppl ratio: exp(mean NLL) of the next {CONTINUATION} tokens, teacher forced, over the full cache's. "
              f"Teacher-forced agreement: the fraction of those {CONTINUATION} positions where the configuration's "
              f"argmax equals the full cache's, both fed the true tokens. Greedy: fraction of {GREEDY} free-running "
              "greedy tokens equal to the full cache's, and the matching prefix. `full (h2o graph) vs twin`: the twin "
              "(no pass) against the h2o graph's full cache, the noise floor of the comparison. Per-prompt values: "
              "kv_cache.json (quality, quality_mean[].per_prompt).", ""]
    lines += quality_table(res["quality_mean"], res["quality"])
    lines += ["", "## Pass-key retrieval (SmolLM2; successes out of trials)", ""] + passkey_table(res["passkey"])
    g = res.get("gemma")
    if g:
        lines += ["", "## Gemma 3 270M (4-bit, window graph)", "",
                  f"`{m['artifacts_gemma']}`: 5 of every 6 layers attend to their last 512 slots (sliding window), so "
                  "window budgets below 512 only. One exact prefill per length (Vim manual from token "
                  f"{OFFSET}, after Gemma's <bos>), forked into the full cache (the same graph, a budget that never "
                  "evicts) and window 256 / 508; speed round-robin as above, speed-up over the full cache.", ""]
        lines += speed_table(g["speed"], "speedup_vs_full", "full cache")
        lines += [""] + quality_table(quality_means(g["quality"]), g["quality"])
        lines += ["", "Pass-key:", ""] + passkey_table(g["passkey"])
    lines += ["", "## Method", "",
              "- Fork trick: one full-attention prefill per prompt (`PolicyDecoder.feed_prompt`, the last call being "
              "the 32-token observation window) keeps both candidate scores (h2o's accumulated mass, snapkv's pooled "
              "window mass); `fork(policy)` + `finish_prefill()` copies it and compacts it as that policy's own exact "
              "prefill would, so every configuration of a prompt starts from the same prefill (and it is paid once).",
              "- Round-robin timing: all decoders of one prompt step in turns of 5, so background load and thermal "
              "state hit them alike; the first step of each turn is untimed (it pays for waking its session's thread "
              "pool after another session's step).",
              "- Memory: VmHWM of a fresh process per configuration (not ru_maxrss, which Linux carries across exec); "
              "/proc/self/clear_refs 5 resets the peak after loading, so the generation's own peak is separable from "
              "the load's.",
              "", "## Caveats", "",
              "- Greedy agreement is brittle: one flipped near-tie (top-1 vs top-2 logit margin in the quality rows' "
              "`divergence_margin_*`) sends the free-running streams apart for the rest of the 64 tokens, which is "
              "why two equivalent full caches (the noise-floor row) can agree on few tokens. Teacher-forced agreement "
              "re-synchronises every step and is the stable figure.",
              "- The h2o graph is not bit-identical to the twin: its `qk_output` (attention probabilities out) "
              "changes GroupQueryAttention's kernel path, ~1e-6 per node, amplified through the int8-activation "
              "4-bit layers: the first logits (after the prompt) differ by at most "
              + ", ".join(f"{r['first_logits_maxdiff_vs_twin']:.2f} at {r['prompt']}" for r in res["speed"]
                          if "first_logits_maxdiff_vs_twin" in r)
              + " tokens. (Checked apart from this script: the window graph, position_ids without attention "
              "probabilities, gives the twin's logits bit for bit.)",
              "- Round-robin order: each turn runs the twin, the h2o graph's decoders, then the window graph's; the "
              "first decoder after a session switch (h2o graph full cache, window 512) can pay more than its untimed "
              "first step (a wide p25-p75), so its speed-up is a lower bound.",
              "- An exact prefill peaks at the full prompt's cache (the h2o/snapkv/window exact rows of the memory "
              "table: peak rows = the prompt) before compacting to the budget; only window's stream prefill stays at "
              "budget + chunk rows. On the h2o graph the prefill also holds every layer's attention probabilities for "
              "one chunk (layers x heads x 64 x prompt floats, about 270 MiB at 4k for SmolLM2): `finish_prefill` "
              "frees them (KV MiB after prefill), but the process's peak is reached before, during the prefill.",
              "- Gemma's full cache is the same graph with a never-evicting budget (there is no twin), so its "
              "speed-up is over that. Its window keeps the sinks in every layer, the sliding-window layers "
              "included, which in the model never see a token more than 512 positions back; the prompts start at "
              "<bos> then mid-document text, so sinks = 4 also keeps three ordinary tokens at distances the model "
              "never attends over there: the `sinks 1` rows (only <bos>) show what that costs."]
    return "\n".join(lines) + "\n"


def plot(speed: list[dict], gemma_speed: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(speed, "SmolLM2-135M int4")] + ([(gemma_speed, "Gemma 3 270M int4")] if gemma_speed else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (rows, title) in zip(axes[0], panels):
        for config in dict.fromkeys(r["config"] for r in rows):
            rs = [r for r in rows if r["config"] == config]
            x = [r["prompt"] for r in rs]
            y = [r["ms_median"] for r in rs]
            err = [[r["ms_median"] - r["ms_p25"] for r in rs], [r["ms_p75"] - r["ms_median"] for r in rs]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=config,
                        linestyle="--" if "full" in config else "-")
        ns = sorted({r["prompt"] for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("decode ms/token (median, p25-p75)")
        ax.set_title(f"{title}, {THREADS} threads: KV budget vs full cache")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- main ------------------------------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _json(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def write(res: dict, out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=_json) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke of every section: 1k prompts, one document")
    ap.add_argument("--out", help="output prefix (default benchmarks/kv_cache; /tmp/kv_cache_quick with --quick)")
    ap.add_argument("--h2o", default="/tmp/kv-h2o", help="examples/smollm2-kv.toml's artifact (the scores graph)")
    ap.add_argument("--window", default="/tmp/kv-window", help="examples/smollm2-kv-window.toml's artifact")
    ap.add_argument("--full", default="/tmp/kv-full", help="examples/smollm2-kv-full.toml's artifact")
    ap.add_argument("--gemma", default="/tmp/kv-gemma3", help="examples/gemma3-kv.toml's artifact ('' to skip)")
    ap.add_argument("--quality-lengths", default="2048,4096",
                    help="SmolLM2 quality prompt lengths (1024 as well: about 2 more minutes)")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        print(json.dumps(rss_child(json.loads(args.rss_child))))
        return
    out = Path(args.out or ("/tmp/kv_cache_quick" if args.quick else ROOT / "benchmarks" / "kv_cache"))
    folders = {"h2o": Path(args.h2o), "window": Path(args.window), "full": Path(args.full)}
    gemma_folder = Path(args.gemma) if args.gemma else None
    missing = [str(f) for f in [*folders.values(), gemma_folder] if f and not (f / "manifest.json").exists()]
    if missing:
        sys.exit(f"missing artifacts {missing}: build them first (see this script's docstring)")
    q = args.quick
    speed_lengths = (1024,) if q else (2048, 4096, MAX_POSITIONS - 64)
    quality_lengths = (1024,) if q else tuple(int(x) for x in args.quality_lengths.split(","))
    offsets = {1024: (OFFSET, 40000)} if q else {4096: OFFSETS_4K}
    passkey_lengths, passkey_trials = ((1024,), 2) if q else ((2048, 4096), 5)
    memory_length, target_length = (1024, 1024) if q else (4096, 4096)
    gemma_lengths, gemma_passkey, gemma_trials = ((1024,), 1024, 1) if q else ((2048, 4096), 4096, 5)

    models = {k: load(f, threads=THREADS) for k, f in folders.items()}
    texts = documents()
    docs = {name: models["h2o"].encode(text) for name, text in texts.items()}
    if q:
        docs = dict(list(docs.items())[:1])
    speed_doc = next(iter(docs))
    res = {"meta": {"command": " ".join(["python", "benchmarks/kv_cache.py", *sys.argv[1:]]), "quick": q,
                    "cpu": cpu_name(), "cpus": os.cpu_count(), "threads": THREADS,
                    "onnxruntime": ort.__version__, "python": platform.python_version(),
                    "artifacts": {k: str(f) for k, f in folders.items()},
                    "artifacts_gemma": str(gemma_folder) if gemma_folder else None,
                    "kv_policies": {k: m.kv_policy for k, m in models.items()},
                    "documents": [{"name": n, "tokens": len(ids), "chars": len(texts[n])} for n, ids in docs.items()],
                    "prompt_offset": OFFSET, "quality_offsets": {str(n): list(offsets.get(n, (OFFSET,)))
                                                                 for n in quality_lengths},
                    "continuation": CONTINUATION, "greedy_tokens": GREEDY,
                    "speed_timed_steps": STEPS, "speed_rounds": ROUNDS, "speed_block": BLOCK,
                    "warmup_steps": WARMUP, "speed_document": speed_doc,
                    "sinks": SINKS, "recent": RECENT, "load_average_start": os.getloadavg()[0]},
           "speed": [], "memory": [], "quality": [], "quality_mean": [], "passkey": [], "passkey_trials": []}
    log(f"documents: {[(n, len(i)) for n, i in docs.items()]}")

    sections, t = res["meta"].setdefault("sections_s", {}), time.perf_counter()

    def done(name: str) -> None:
        nonlocal t
        sections[name] = time.perf_counter() - t
        log(f"== section {name}: {sections[name]:.0f}s")
        t = time.perf_counter()
        write(res, out)

    for n in speed_lengths:
        res["speed"] += speed_at(models, docs[speed_doc], n)
        write(res, out)
    done("speed")
    res["memory"] = memory(folders, docs[speed_doc], memory_length)
    done("memory")
    for n in quality_lengths:
        for name, ids in docs.items():
            for off in offsets.get(n, (OFFSET,)):
                if off + n + CONTINUATION > len(ids):
                    log(f"quality {name[:10]} n={n} @{off}: past the document's end, skipped")
                    continue
                res["quality"] += quality(models["h2o"], models["full"], name, ids, n, off)
                write(res, out)
    res["quality_mean"] = quality_means(res["quality"])
    done("quality")
    res["passkey"], res["passkey_trials"] = passkey(models["h2o"], passkey_lengths, passkey_trials)
    done("passkey")
    if gemma_folder:
        del models
        gc.collect()
        gm = load(gemma_folder, threads=THREADS)
        res["meta"]["kv_policy_gemma"] = gm.kv_policy
        name = next(iter(texts))
        res["gemma"] = gemma(gm, name, gm.encode(texts[name]), gemma_lengths, gemma_passkey, gemma_trials)
        res["gemma"]["quality_mean"] = quality_means(res["gemma"]["quality"])
        res["gemma"]["document"] = name
        del gm
        done("gemma")
    res["targets"] = targets(res["speed"], res["quality_mean"], res["passkey"], target_length)
    res["meta"].update(runtime_s=time.perf_counter() - T0, load_average_end=os.getloadavg()[0])
    write(res, out)
    out.with_suffix(".md").write_text(markdown(res))
    plot(res["speed"], (res.get("gemma") or {}).get("speed"), out.with_suffix(".png"))
    log(f"wrote {out}.json, .md, .png")
    print(json.dumps(res["targets"], indent=1, default=_json), flush=True)


if __name__ == "__main__":
    main()
