"""ToMe against PiToMe's two energies on text: MiniLM 16 x 128, the same FLOPs reduction, PyTorch program (merging
decides the same tokens as the exported graph; tests check the export agrees). Quality: cosine to dense on 64
held-out Wikipedia passages that fill the 128 tokens, and Pearson r with the Lee corpus human judgements.

    python benchmarks/merge_energy.py [REDUCTION] --> benchmarks/merge_energy.json
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

from compressor.program.handle import load
from compressor.pipeline.pass_manager import Pipeline
from compressor.passes import TokenMerge
from compressor.sources.inputs import preprocessor, wiki_windows
from compressor.sources import data
torch.set_num_threads(2)
reduction = float(sys.argv[1]) if len(sys.argv) > 1 else 0.4
texts = wiki_windows(64, 128)
docs = data.lee_documents(); human = data.lee_human_similarities(); iu = np.triu_indices(50, k=1)
def embed(h, samples):
    pre = preprocessor(h); out = []
    prog = h.program().eval()
    for i in range(0, len(samples), 16):
        chunk = samples[i:i + 16]; chunk = chunk + [chunk[-1]] * (16 - len(chunk))
        f = pre(chunk)
        with torch.no_grad():
            out.append(prog(*[torch.from_numpy(f[s.name]) for s in h.input_specs()]).numpy())
    return np.concatenate(out)[:len(samples)]
rows = {}
dense = load("example:minilm", batch=16, seq_len=128)
ref_p, ref_d = embed(dense, texts), embed(dense, docs)
for method in ("tome", "pitome", "pitome_text"):
    h = load("example:minilm", batch=16, seq_len=128)
    Pipeline([TokenMerge(reduction=reduction, method=method, proportional_attention=False)]).run(h)
    p, d = embed(h, texts), embed(h, docs)
    cos = (p * ref_p).sum(1) / np.linalg.norm(p, axis=1) / np.linalg.norm(ref_p, axis=1)
    u = d / np.linalg.norm(d, axis=1, keepdims=True)
    r = float(np.corrcoef((u @ u.T)[iu], human[iu])[0, 1])
    rows[method] = {"schedule": h.plan.merges, "cosine_passages": float(cos.mean()), "lee_pearson": r}
    print(method, rows[method], flush=True)
u = ref_d / np.linalg.norm(ref_d, axis=1, keepdims=True)
dense_r = float(np.corrcoef((u @ u.T)[iu], human[iu])[0, 1])
print("dense lee", dense_r)
out = {"model": "example:minilm", "shapes": {"batch": 16, "seq_len": 128}, "reduction": reduction,
       "proportional_attention": False, "dense_lee_pearson": dense_r, "rows": rows}
Path(__file__).with_name("merge_energy.json").write_text(json.dumps(out, indent=2))
