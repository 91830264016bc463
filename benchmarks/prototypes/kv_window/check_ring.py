"""Ring eviction (newest row into the oldest slot) vs 'shift' (layout kept in position order): same resident set,
so logits must agree up to float summation order. Teacher-forced with the full cache's greedy tokens, 1k prompt."""
import sys
from pathlib import Path
import numpy as np
sys.path.insert(0, str(Path(__file__).parent))
from kv_window import HERE, WindowDecoder, long_text_ids, session
from tokenizers import Tokenizer
tok = Tokenizer.from_file(str(HERE / "smollm2-kv/tokenizer.json"))
ids = long_text_ids(tok)[:1024]
sess = session(HERE / "smollm2-kv/model.onnx", 2)
full = WindowDecoder(sess, 1024 + 40)
lg = full.prefill(ids, 256)
toks = []
for _ in range(32):
    toks.append(int(np.argmax(lg))); lg = full.step(toks[-1])
res = {}
for ev in ("ring", "shift"):
    d = WindowDecoder(sess, 260, 4, 256, ev)
    rows = [d.prefill(ids, 256).copy()]
    for t in toks[:-1]:
        rows.append(d.step(t).copy())
    res[ev] = (np.array(rows), d.slot_pos[:d.L].copy())
a, b = res["ring"][0], res["shift"][0]
print("resident positions equal as sets:", sorted(res["ring"][1].tolist()) == sorted(res["shift"][1].tolist()),
      "| ring slot order (first 8 non-sink):", res["ring"][1][4:12].tolist())
print("max |logit diff| ring vs shift over 32 steps:", float(np.abs(a - b).max()),
      "| argmax equal:", float((a.argmax(-1) == b.argmax(-1)).mean()))
print("per-step max diff:", np.round(np.abs(a - b).max(-1), 5).tolist())

def top_stats(x, y, k=16):
    idx = np.argsort(-y, -1)[:, :k]
    d = np.abs(np.take_along_axis(x, idx, -1) - np.take_along_axis(y, idx, -1)).max()
    lx = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
    ly = y - np.log(np.exp(y - y.max(-1, keepdims=True)).sum(-1, keepdims=True)) - y.max(-1, keepdims=True)
    kl = (np.exp(ly) * (ly - lx)).sum(-1).max()
    return d, kl
d, kl = top_stats(a, b)
print(f"ring vs shift: max |diff| over the shift run's top-16 logits {d:.3e}; max KL(shift||ring) per step {kl:.3e}")
flip = np.where(a.argmax(-1) != b.argmax(-1))[0]
for f in flip:
    s = np.sort(b[f])[::-1]
    print(f"  step {f}: argmax differs; shift top-2 margin {s[0]-s[1]:.4f}")
# noise floor: full cache with rows 10/200 swapped in layer 0 (same math, other summation order)
def full_run(swap):
    d = WindowDecoder(sess, 1100); lg = d.prefill(ids, 256)
    if swap:
        x = d.buf[0, :, 0]; x[:, :, [10, 200], :] = x[:, :, [200, 10], :]
    rows = [lg.copy()]
    for t in toks[:-1]:
        rows.append(d.step(t).copy())
    return np.array(rows)
d, kl = top_stats(full_run(True), full_run(False))
print(f"noise floor (full cache, two rows swapped in layer 0): top-16 max diff {d:.3e}; max KL {kl:.3e}")
