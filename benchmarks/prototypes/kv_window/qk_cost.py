"""Cost of asking GroupQueryAttention for attention probabilities (qk_output=2, what H2O needs): one decode step of a
SmolLM2-shaped layer (9 q heads, 3 kv heads, head 64, packed QKV) over L resident rows, x30 layers."""
import time
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper
HQ, HKV, D, MAXPOS = 9, 3, 64, 8192
inv = 1.0 / (1e5 ** (np.arange(0, D, 2) / D)); ang = np.arange(MAXPOS)[:, None] * inv[None]
COS, SIN = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
def model(cap, qk):
    ins = [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 1, (HQ + 2 * HKV) * D]),
           helper.make_tensor_value_info("past_k", TensorProto.FLOAT, [1, HKV, cap, D]),
           helper.make_tensor_value_info("past_v", TensorProto.FLOAT, [1, HKV, cap, D]),
           helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
           helper.make_tensor_value_info("total", TensorProto.INT32, []),
           helper.make_tensor_value_info("pos", TensorProto.INT64, [1, 1])]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("out", "pk", "pv")]
    no = ["out", "pk", "pv"]; attrs = {}
    if qk:
        outs.append(helper.make_tensor_value_info("qk", TensorProto.FLOAT, None)); no.append("qk"); attrs["qk_output"] = qk
    node = helper.make_node("GroupQueryAttention", ["q", "", "", "past_k", "past_v", "seqlens_k", "total", "cos", "sin", "pos"], no,
                            domain="com.microsoft", num_heads=HQ, kv_num_heads=HKV, do_rotary=1, scale=0.125, **attrs)
    g = helper.make_graph([node], "g", ins, outs, [helper.make_tensor("cos", TensorProto.FLOAT, COS.shape, COS.ravel()),
                                                   helper.make_tensor("sin", TensorProto.FLOAT, SIN.shape, SIN.ravel())])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    o = ort.SessionOptions(); o.intra_op_num_threads = 2
    return ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
for L in (259, 1027, 4144):
    cap = L + 1
    res = {}
    for qk in (0, 2):
        s = model(cap, qk)
        bk = rng.standard_normal((1, HKV, cap, D)).astype(np.float32); bv = rng.standard_normal((1, HKV, cap, D)).astype(np.float32)
        io = s.io_binding()
        a, b = ort.OrtValue.ortvalue_from_numpy(bk), ort.OrtValue.ortvalue_from_numpy(bv)
        io.bind_ortvalue_input("past_k", a); io.bind_ortvalue_output("pk", a)
        io.bind_ortvalue_input("past_v", b); io.bind_ortvalue_output("pv", b)
        io.bind_cpu_input("q", rng.standard_normal((1, 1, (HQ + 2 * HKV) * D)).astype(np.float32))
        io.bind_cpu_input("seqlens_k", np.array([L], np.int32)); io.bind_cpu_input("total", np.array(L + 1, np.int32))
        io.bind_cpu_input("pos", np.array([[L + 100]], np.int64))
        io.bind_output("out")
        if qk: io.bind_output("qk")
        for _ in range(20): s.run_with_iobinding(io)
        t = []
        for _ in range(200):
            t0 = time.perf_counter(); s.run_with_iobinding(io); t.append(time.perf_counter() - t0)
        res[qk] = 1e3 * np.median(t)
        if qk: shape = io.get_outputs()[-1].shape()
    print(f"L={L}: one layer {res[0]*1e3:.0f} us -> {res[2]*1e3:.0f} us with qk_output=2 (probs {shape}); x30 layers: +{30*(res[2]-res[0]):.2f} ms/token")
