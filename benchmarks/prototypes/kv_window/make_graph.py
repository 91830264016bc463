"""Copy the SmolLM2 int4 artifact's graph with (1) a position_ids (B, S) int64 input wired into every
GroupQueryAttention (input 9) and (2) rotary tables extended to the model's 8192 positions (rope_theta 1e5, no
scaling), so positions are independent of the KV capacity. Writes benchmarks/prototypes/kv_window/smollm2-kv/model.onnx."""
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SRC = Path(__file__).resolve().parents[3] / "out" / "smollm2-int4"  # compress run examples/smollm2-int4.toml --output out/smollm2-int4
DST = Path("benchmarks/prototypes/kv_window/smollm2-kv")
DST.mkdir(parents=True, exist_ok=True)
for f in ("tokenizer.json", "manifest.json"):
    shutil.copy(SRC / f, DST / f)
cfg = json.loads((SRC / "hf/config.json").read_text())
rows = int(cfg["max_position_embeddings"])

m = onnx.load(str(SRC / "model.onnx"))
g = m.graph
g.input.insert(2, helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"]))
n = 0
for node in g.node:
    if node.op_type == "GroupQueryAttention":
        ins = list(node.input)
        ins += [""] * (9 - len(ins))
        ins = ins[:9] + ["position_ids"] + ins[10:]
        del node.input[:]
        node.input.extend(ins)
        n += 1
hd = cfg["head_dim"]
inv = 1.0 / (cfg["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))
ang = np.arange(rows, dtype=np.float32)[:, None] * inv[None]
for i, init in enumerate(g.initializer):
    if init.name.startswith("rotary.") and (init.name.endswith(".cos") or init.name.endswith(".sin")):
        old = numpy_helper.to_array(init)
        new = (np.cos(ang) if init.name.endswith(".cos") else np.sin(ang)).astype(np.float32)[:, :old.shape[1]]
        err = float(np.abs(new[:old.shape[0]] - old).max())
        print(f"{init.name}: {old.shape} -> {new.shape}; max |recomputed - original| over original rows = {err:.2e}")
        # keep the original rows bit for bit, append the new ones
        new[:old.shape[0]] = old
        g.initializer[i].CopyFrom(numpy_helper.from_array(new, init.name))
onnx.save_model(m, str(DST / "model.onnx"))
print(f"wired position_ids into {n} GroupQueryAttention nodes -> {DST / 'model.onnx'}")
