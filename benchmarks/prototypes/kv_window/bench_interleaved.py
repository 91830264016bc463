"""Decode ms/token, full cache vs window caches, measured round-robin (one step of each decoder in turn) so that load
from other processes on this 2-core machine hits every configuration alike. One full-attention prefill per prompt
length (chunked, timed); the window decoders start from its compacted copy (identical to their 'exact' prefill)."""
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from kv_window import HERE, WindowDecoder, long_text_ids, session  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 48
THREADS = int(sys.argv[2]) if len(sys.argv) > 2 else 2
tok = Tokenizer.from_file(str(HERE / "smollm2-kv/tokenizer.json"))
ids = long_text_ids(tok)
sess = session(HERE / "smollm2-kv/model.onnx", THREADS)
out = {"threads": THREADS, "steps": STEPS, "rows": []}
for n in (1024, 2048, 4096):
    full = WindowDecoder(sess, n + STEPS + 1)
    t0 = time.perf_counter()
    first = full.prefill(ids[:n], 256)
    pre_full = time.perf_counter() - t0
    decs = {"full": full}
    for sinks, window in ((4, 256), (4, 1024)):
        d = WindowDecoder(sess, sinks + window, sinks, window)
        keep = min(full.L, sinks + window - 1)
        d.buf[..., :sinks, :] = full.buf[..., :sinks, :]
        d.buf[..., sinks:keep, :] = full.buf[..., full.L - (keep - sinks):full.L, :]
        d.slot_pos[:sinks] = np.arange(sinks)
        d.slot_pos[sinks:keep] = np.arange(full.L - (keep - sinks), full.L)
        d.L, d.pos = keep, full.pos
        decs[f"window {sinks}+{window}"] = d
    # streaming prefill cost (window compaction before every chunk), timed separately
    s = WindowDecoder(sess, 4 + 1024 - 1 + 256, 4, 1024)
    t0 = time.perf_counter()
    s.prefill(ids[:n], 256, "stream")
    pre_stream = time.perf_counter() - t0
    del s
    logits = {k: first for k in decs}
    times = {k: [] for k in decs}
    for _ in range(STEPS):
        for k, d in decs.items():
            t = int(np.argmax(logits[k]))
            t0 = time.perf_counter()
            logits[k] = d.step(t)
            times[k].append(time.perf_counter() - t0)
    for k, v in times.items():
        v = np.array(v[2:]) * 1e3  # drop 2 warm-up steps
        row = {"prompt": n, "cache": k, "resident": int(decs[k].L), "ms_median": float(np.median(v)),
               "ms_p25": float(np.percentile(v, 25)), "ms_p75": float(np.percentile(v, 75))}
        if k == "full":
            row["prefill_full_s"] = pre_full
            row["prefill_stream_1024_s"] = pre_stream
        print(json.dumps(row), flush=True)
        out["rows"].append(row)
    del decs, full
(HERE / f"bench_t{THREADS}.json").write_text(json.dumps(out, indent=1))
