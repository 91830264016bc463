"""The issue-22 targets for the configurations a user is offered, at a 4,096-token prompt: examples/smollm2-kv.toml
(snapkv, 1024 slots), snapkv at 512, and h2o with its default recent window (half the budget) at 512 and 1024.

Beside benchmarks/kv_cache.py (the full grid), with two things it lacks: a noise floor for greedy agreement (the twin
against the policy graph with its full cache: two equivalent full caches) and teacher-forced argmax agreement (both
caches fed the true continuation), which one near-tie cannot flip.

    compress run examples/smollm2-kv.toml --output /tmp/kv-h2o        # (or any scores graph: the policies run by override)
    compress run examples/smollm2-kv-full.toml --output /tmp/kv-full  # the twin: no pass, full cache
    python benchmarks/kv_cache_example.py                             # -> benchmarks/kv_cache_example.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kv_cache as kb  # noqa: E402

N = 4096
OFFSETS = (2000, 40000)  # two prompts per document
CONFIGS = [("snapkv", 1024), ("snapkv", 512), ("h2o", 1024), ("h2o", 512)]
PASSKEY_TRIALS = 5


def policy(name: str, slots: int):
    return kb.KVBudget(name, slots, sinks=kb.SINKS)  # recent: the runtime's defaults (snapkv 32, h2o half)


def teacher(parent, pol, first, cont):
    """-log p and argmax of every continuation step, the true tokens fed."""
    d = kb.forked(parent, pol)
    nll, top, logits = np.empty(len(cont)), np.empty(len(cont), np.int64), first
    for i, t in enumerate(cont):
        nll[i], top[i] = -kb.log_softmax(logits)[t], int(np.argmax(logits))
        if i + 1 < len(cont):
            logits = d.step(int(t))
    return nll, top


def quality(models, doc, ids, offset) -> list[dict]:
    prompt, cont = ids[offset:offset + N], ids[offset + N:offset + N + kb.CONTINUATION]
    new = kb.CONTINUATION + kb.GREEDY
    parent, first = kb.prefilled(models["h2o"], prompt, new)
    full = kb.full_cache(N, new)
    nll_full, top_full = teacher(parent, full, first, cont)
    ref = kb.greedy(parent, full, first, kb.GREEDY)
    twin = kb.twin_decoder(models["full"], prompt, kb.GREEDY + 2)
    twin_tokens, logits = [], twin.first
    for _ in range(kb.GREEDY):
        twin_tokens.append(int(np.argmax(logits)))
        logits = twin.step(twin_tokens[-1])
    floor = kb.agreement(ref, twin_tokens)
    rows = [{"doc": doc, "offset": offset, "config": "full (policy graph) vs twin", "greedy_agreement": floor[0],
             "greedy_prefix": floor[1]}]
    for name, slots in CONFIGS:
        nll, top = teacher(parent, policy(name, slots), first, cont)
        agree, prefix = kb.agreement(kb.greedy(parent, policy(name, slots), first, kb.GREEDY), ref)
        rows.append({"doc": doc, "offset": offset, "config": f"{name} {slots}",
                     "ppl_ratio": float(np.exp(nll.mean() - nll_full.mean())),
                     "teacher_forced_agreement": float(np.mean(top == top_full)),
                     "greedy_agreement": agree, "greedy_prefix": prefix})
        kb.log(f"{doc[:10]}@{offset} {name} {slots}: ppl x{rows[-1]['ppl_ratio']:.3f}, teacher-forced "
               f"{rows[-1]['teacher_forced_agreement']:.2f}, greedy {agree:.2f} (floor {floor[0]:.2f})")
    return rows


def passkey(m) -> list[dict]:
    depths = [(i + 0.5) / PASSKEY_TRIALS for i in range(PASSKEY_TRIALS)]
    keys = np.random.default_rng([20240, N]).integers(10000, 100000, PASSKEY_TRIALS)  # kv_cache.py's keys
    hits = {"full": 0, **{f"{p} {s}": 0 for p, s in CONFIGS}}
    for depth, key in zip(depths, keys):
        prompt = kb.passkey_prompt(m, N, depth, int(key))
        parent, first = kb.prefilled(m, prompt, kb.PASSKEY_NEW)
        pols = {"full": kb.full_cache(len(prompt), kb.PASSKEY_NEW), **{f"{p} {s}": policy(p, s) for p, s in CONFIGS}}
        for name, pol in pols.items():
            hits[name] += str(int(key)) in m.decode(kb.greedy(parent, pol, first, kb.PASSKEY_NEW))
        kb.log(f"pass-key depth {depth:.1f}: {hits}")
    return [{"config": k, "successes": v, "trials": PASSKEY_TRIALS} for k, v in hits.items()]


def speed(models, ids) -> list[dict]:
    prompt, new = ids[kb.OFFSET:kb.OFFSET + N], kb.ROUNDS * kb.BLOCK + kb.WARMUP + 2
    decs = [kb.twin_decoder(models["full"], prompt, new)]
    decs += kb.policy_decoders(models["h2o"], "h2o", prompt, new, [(f"{p} {s}", policy(p, s)) for p, s in CONFIGS])
    for turn in range(1 + kb.ROUNDS):  # as kv_cache.py: blocks of steps, each block's first step untimed
        for r in decs:
            for j in range(kb.WARMUP if turn == 0 else kb.BLOCK):
                t = time.perf_counter()
                r.logits = r.step(int(np.argmax(r.logits)))
                if turn and j:
                    r.times.append(time.perf_counter() - t)
    twin_ms = float(np.median(decs[0].times)) * 1e3
    return [{"config": r.name, "ms_median": float(np.median(r.times)) * 1e3,
             "speedup_vs_twin": twin_ms / (float(np.median(r.times)) * 1e3), "prefill_s": r.prefill_s} for r in decs]


def genai(ids, build: str, python: str) -> dict | None:
    """onnxruntime-genai's INT4 build (what an LLM user deploys on a CPU today) on the same 4,096-token prompt, full
    cache, through benchmarks/genai_worker.py in its own venv. Sequential with ours, not interleaved: a ratio to read
    with the load average beside it."""
    import os
    import subprocess

    if not (Path(build) / "genai_config.json").exists() or not Path(python).exists():
        return None
    req = {"cmd": "decode", "model": build, "prompts": [ids[kb.OFFSET:kb.OFFSET + N]], "new_tokens": kb.GREEDY,
           "threads": kb.THREADS, "ignore_eos": True}
    done = subprocess.run([python, str(Path(__file__).with_name("genai_worker.py")), json.dumps(req)],
                          capture_output=True, text=True, timeout=900)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    out = json.loads(done.stdout)
    out["load_average"] = os.getloadavg()[0]
    return out


def main() -> None:
    models = {"h2o": kb.load(sys.argv[1] if len(sys.argv) > 1 else "/tmp/kv-h2o", threads=kb.THREADS),
              "full": kb.load(sys.argv[2] if len(sys.argv) > 2 else "/tmp/kv-full", threads=kb.THREADS)}
    docs = {n: models["h2o"].encode(t) for n, t in kb.documents().items()}
    res = {"command": "python benchmarks/kv_cache_example.py", "prompt": N, "configs": CONFIGS,
           "speed": speed(models, next(iter(docs.values())))}
    g = genai(next(iter(docs.values())), "/work/genai-builds/smollm2-int4", "/work/genai-venv/bin/python")
    if g is not None:
        res["genai_int4"] = g
    kb.log(f"speed: {res['speed']}; genai: {g}")
    res["quality"] = [r for name, ids in docs.items() for off in OFFSETS for r in quality(models, name, ids, off)]
    res["passkey"] = passkey(models["h2o"])
    means = {}
    for r in res["quality"]:
        m = means.setdefault(r["config"], {k: [] for k in r if isinstance(r[k], float) or k == "greedy_prefix"})
        for k in m:
            m[k].append(r[k])
    res["quality_mean"] = {c: {k: float(np.mean(v)) for k, v in m.items()} for c, m in means.items()}
    out = Path(__file__).with_name("kv_cache_example.json")
    out.write_text(json.dumps(res, indent=1))
    kb.log(f"wrote {out}: {json.dumps(res['quality_mean'], indent=1)}\n{res['passkey']}")


if __name__ == "__main__":
    main()
