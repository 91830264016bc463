"""Single-node probe of onnxruntime's GroupQueryAttention (CPU, installed version): where does the rotary position of
new tokens come from (seqlens_k or position_ids), are keys stored rotated, where are new rows written in a shared
buffer, and does a compacted (arbitrary) cache content get attended as-is."""
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

HQ, HKV, D, CAP, MAXPOS = 2, 1, 64, 16, 256
rng = np.random.default_rng(0)
inv = 1.0 / (10000 ** (np.arange(0, D, 2) / D))
ang = np.arange(MAXPOS)[:, None] * inv[None]
COS, SIN = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def rope(x, pos):  # x (..., D), half-split rotation at position pos
    c, s = COS[pos], SIN[pos]
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def model(with_pos: bool, qk_output: int = 0):
    ins = [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, "S", HQ * D]),
           helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, "S", HKV * D]),
           helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, "S", HKV * D]),
           helper.make_tensor_value_info("past_k", TensorProto.FLOAT, [1, HKV, CAP, D]),
           helper.make_tensor_value_info("past_v", TensorProto.FLOAT, [1, HKV, CAP, D]),
           helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
           helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    node_in = ["q", "k", "v", "past_k", "past_v", "seqlens_k", "total", "cos", "sin"]
    if with_pos:
        ins.append(helper.make_tensor_value_info("pos", TensorProto.INT64, [1, "S"]))
        node_in.append("pos")
    outs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, "S", HQ * D]),
            helper.make_tensor_value_info("present_k", TensorProto.FLOAT, [1, HKV, CAP, D]),
            helper.make_tensor_value_info("present_v", TensorProto.FLOAT, [1, HKV, CAP, D])]
    node_out = ["out", "present_k", "present_v"]
    attrs = dict(num_heads=HQ, kv_num_heads=HKV, do_rotary=1, rotary_interleaved=0, scale=1 / np.sqrt(D))
    if qk_output:
        outs.append(helper.make_tensor_value_info("qk", TensorProto.FLOAT, None))
        node_out.append("qk")
        attrs["qk_output"] = qk_output
    node = helper.make_node("GroupQueryAttention", node_in, node_out, domain="com.microsoft", **attrs)
    g = helper.make_graph([node], "g", ins, outs, [helper.make_tensor("cos", TensorProto.FLOAT, COS.shape, COS.ravel()),
                                                   helper.make_tensor("sin", TensorProto.FLOAT, SIN.shape, SIN.ravel())])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


def run_shared(sess, buf_k, buf_v, q, k, v, resident_after, pos=None, extra=()):
    """Shared buffer: bind buf_k/buf_v as both past and present (the runtime's mode)."""
    io = sess.io_binding()
    io.bind_output("out")
    bk, bv = ort.OrtValue.ortvalue_from_numpy(buf_k), ort.OrtValue.ortvalue_from_numpy(buf_v)
    io.bind_ortvalue_input("past_k", bk); io.bind_ortvalue_output("present_k", bk)
    io.bind_ortvalue_input("past_v", bv); io.bind_ortvalue_output("present_v", bv)
    for n, a in [("q", q), ("k", k), ("v", v), ("seqlens_k", np.array([resident_after - 1], np.int32)),
                 ("total", np.array(resident_after, np.int32))]:
        io.bind_cpu_input(n, a)
    if pos is not None:
        io.bind_cpu_input("pos", np.asarray(pos, np.int64).reshape(1, -1))
    for e in extra:
        io.bind_output(e)
    sess.run_with_iobinding(io)
    outs = [o.numpy() for o in io.get_outputs()]
    return [outs[0]] + outs[3:]


def ref_attention(q_rot, keys, vals):  # q_rot (HQ, D), keys/vals (n, D) (HKV == 1)
    s = q_rot @ keys.T / np.sqrt(D)
    p = np.exp(s - s.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
    return (p @ vals).reshape(-1), p


print("onnxruntime", ort.__version__)
for with_pos in (False, True):
    sess = model(with_pos)
    bk = np.zeros((1, HKV, CAP, D), np.float32); bv = np.zeros_like(bk)
    P = 4
    q = rng.standard_normal((1, P, HQ * D)).astype(np.float32)
    k = rng.standard_normal((1, P, D)).astype(np.float32); v = rng.standard_normal((1, P, D)).astype(np.float32)
    run_shared(sess, bk, bv, q, k, v, P, pos=np.arange(P) if with_pos else None)
    stored_rot = np.allclose(bk[0, 0, :P], rope(k[0], np.arange(P)), atol=1e-5)
    print(f"[pos input={with_pos}] prefill: keys stored rotated at slots 0..3 with positions 0..3: {stored_rot}; "
          f"values stored raw: {np.allclose(bv[0, 0, :P], v[0])}")
    # compacted cache: overwrite slots 0..5 with arbitrary pre-rotated keys (as a runtime compaction would leave them),
    # then decode one token whose true position is 100 while 6 rows are resident (seqlens_k = 6)
    ek = rng.standard_normal((6, D)).astype(np.float32); ev = rng.standard_normal((6, D)).astype(np.float32)
    bk[0, 0, :6], bv[0, 0, :6] = ek, ev
    bk[0, 0, 6:] = 777.0  # garbage beyond the resident rows must not be read (except the new row's slot)
    q1 = rng.standard_normal((1, 1, HQ * D)).astype(np.float32)
    k1 = rng.standard_normal((1, 1, D)).astype(np.float32); v1 = rng.standard_normal((1, 1, D)).astype(np.float32)
    out = run_shared(sess, bk, bv, q1, k1, v1, 7, pos=[100] if with_pos else None)[0]
    for name, p in (("100 (position_ids)", 100), ("6 (= seqlens_k, cache length)", 6)):
        keys = np.concatenate([ek, rope(k1[0], p)]); vals = np.concatenate([ev, v1[0]])
        ref, _ = ref_attention(rope(q1[0, 0].reshape(HQ, D), p), keys, vals)
        print(f"  decode, new token rotated at {name}: output matches {np.allclose(out[0, 0], ref, atol=1e-4)}, "
              f"new key in slot 6 matches {np.allclose(bk[0, 0, 6], rope(k1[0, 0], p), atol=1e-5)}")
    print(f"  rows 0..5 untouched: {np.array_equal(bk[0, 0, :6], ek)}; row 7 untouched: {bool((bk[0, 0, 7] == 777).all())}")

# chunked prefill (S > 1, S != total: "subsequent prompt") with explicit positions after a compaction
sess = model(True)
bk = np.zeros((1, HKV, CAP, D), np.float32); bv = np.zeros_like(bk)
ek = rng.standard_normal((5, D)).astype(np.float32); ev = rng.standard_normal((5, D)).astype(np.float32)
bk[0, 0, :5], bv[0, 0, :5] = ek, ev
S = 3
q = rng.standard_normal((1, S, HQ * D)).astype(np.float32)
k = rng.standard_normal((1, S, D)).astype(np.float32); v = rng.standard_normal((1, S, D)).astype(np.float32)
pos = np.arange(200, 200 + S)
out = run_shared(sess, bk, bv, q, k, v, 5 + S, pos=pos)[0]
ok = True
for s in range(S):
    keys = np.concatenate([ek, rope(k[0, :s + 1], pos[:s + 1])]); vals = np.concatenate([ev, v[0, :s + 1]])
    ref, _ = ref_attention(rope(q[0, s].reshape(HQ, D), pos[s]), keys, vals)
    ok &= np.allclose(out[0, s], ref, atol=1e-4)
print(f"chunk of 3 tokens at positions 200..202 over 5 compacted rows: causal output matches {ok}, keys at slots 5..7 "
      f"{np.allclose(bk[0, 0, 5:8], rope(k[0], pos), atol=1e-5)}")

# first prompt with position_ids: only the first element is used (offset + s)?
bk = np.zeros((1, HKV, CAP, D), np.float32); bv = np.zeros_like(bk)
run_shared(sess, bk, bv, q, k, v, S, pos=[10, 50, 90])
print("first prompt with position_ids [10, 50, 90]: keys rotated at",
      "10,11,12 (offset + s)" if np.allclose(bk[0, 0, :S], rope(k[0], np.arange(10, 13)), atol=1e-5) else
      ("10,50,90 (per token)" if np.allclose(bk[0, 0, :S], rope(k[0], np.array([10, 50, 90])), atol=1e-5) else "?"))

# qk_output: shape and whether it is usable as per-slot attention mass (H2O)
for mode in (1, 2):
    try:
        sess = model(True, qk_output=mode)
        bk = np.zeros((1, HKV, CAP, D), np.float32); bv = np.zeros_like(bk)
        ek = rng.standard_normal((6, D)).astype(np.float32); bk[0, 0, :6] = ek
        res = run_shared(sess, bk, bv, q1, k1, v1, 7, pos=[100], extra=("qk",))
        qk = res[1]
        keys = np.concatenate([ek, rope(k1[0], 100)])
        _, p = ref_attention(rope(q1[0, 0].reshape(HQ, D), 100), keys, np.zeros((7, D), np.float32))
        print(f"qk_output={mode}: shape {qk.shape}, softmax probs match {np.allclose(qk[0, :, 0], p, atol=1e-5)}")
    except Exception as e:
        print(f"qk_output={mode}: {type(e).__name__}: {str(e)[:200]}")
