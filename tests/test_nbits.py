"""MatMulNBits weights: onnxruntime's semantics, exact GGUF carriers on the example checkpoints, ORT re-quantization."""

from __future__ import annotations

import numpy as np
import pytest

from compressor.errors import UsageError
from compressor.lower.nbits import NBitsWeight, pack_codes, pack_zero_points, quantize_weight
from compressor.lower.nbits_graph import matmul_nbits_node


def run_nbits(weight: NBitsWeight, x: np.ndarray, accuracy_level: int = 0, minimums: str = "fp32") -> np.ndarray:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    nodes, inits, out = matmul_nbits_node("x", weight, "w", accuracy_level, minimums=minimums)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, weight.k])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [None, weight.n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def assert_runs_as(weight: NBitsWeight, w: np.ndarray, rtol: float = 1e-5, minimums: str = "fp32") -> None:
    """onnxruntime's MatMulNBits output equals x @ w.T to float rounding."""
    x = np.random.default_rng(0).standard_normal((3, weight.k)).astype(np.float32)
    got = run_nbits(weight, x, minimums=minimums)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    assert np.abs(got - ref).max() <= rtol * np.abs(ref).max(), (weight.origin, np.abs(got - ref).max(), np.abs(ref).max())


@pytest.mark.parametrize("bits,zp_kind", [(4, "none"), (4, "uint8"), (4, "float"), (8, "none"), (8, "uint8"), (8, "float")])
@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
def test_semantics_match_onnxruntime(bits, zp_kind, block_size):
    """(q - zp) * scale; low nibble first; default zp 2^(bits-1); uint8 zp packed like B; float zp used as is."""
    rng = np.random.default_rng(bits * 1000 + block_size)
    n, k = 24, 384  # 384 / 128 = 3 blocks: odd count, so the packed 4-bit zero points carry a pad nibble
    kb = k // block_size
    codes = rng.integers(0, 2**bits, (n, k)).astype(np.uint8)
    scales = rng.uniform(-0.1, 0.1, n * kb).astype(np.float32)
    zp = {"none": None, "uint8": pack_zero_points(rng.integers(0, 2**bits, (n, kb)), bits),
          "float": rng.uniform(-3, 2**bits + 2, n * kb).astype(np.float32)}[zp_kind]
    weight = NBitsWeight(bits, block_size, n, k, pack_codes(codes, bits, block_size), scales, zp, "test")
    zp_values = weight.zero_point_values()
    if zp_kind == "none":
        assert (zp_values == 2 ** (bits - 1)).all()
    expected = (codes.reshape(n, kb, block_size) - zp_values[:, :, None]) * scales.reshape(n, kb, 1)
    np.testing.assert_allclose(weight.dequantize(), expected.reshape(n, k), rtol=1e-6)
    assert_runs_as(weight, weight.dequantize())
    if zp_kind == "float":  # also passed to the kernel as is (the default lowering splits them off)
        if bits == 4:
            assert_runs_as(weight, weight.dequantize(), minimums="native")


def test_8bit_float_zero_points_run_split_though_the_cpu_kernel_refuses_them():
    rng = np.random.default_rng(1)
    weight = NBitsWeight(8, 32, 8, 64, pack_codes(rng.integers(0, 256, (8, 64)), 8, 32), np.ones(16, np.float32),
                         np.full(16, 3.5, np.float32), "test")
    with pytest.raises(Exception, match="8-bit weights with floating-point zero points"):
        run_nbits(weight, np.ones((1, 64), np.float32), minimums="native")
    assert_runs_as(weight, weight.dequantize())


@pytest.mark.parametrize("bits,symmetric,method", [(4, True, "rtn"), (4, False, "rtn"), (8, True, "rtn"), (8, False, "rtn"), (4, False, "hqq")])
def test_requantization_through_onnxruntime(bits, symmetric, method):
    w = (np.random.default_rng(2).standard_normal((96, 128)) * 0.05).astype(np.float32)
    weight = quantize_weight(w, bits=bits, block_size=32, symmetric=symmetric, method=method)
    assert weight.packed.shape == (96, 4, 32 * bits // 8) and weight.scales.shape == (96 * 4,)
    deq = weight.dequantize()
    assert_runs_as(weight, deq)
    # per block, in steps: asymmetric RTN rounds to half a step; ORT's symmetric RTN maps -absmax to -2^(bits-1)
    # and clips +absmax to 2^(bits-1) - 1 (one step); HQQ trades some maximum error for lower mean error
    steps = np.abs(deq - w).reshape(96, 4, 32).max(-1) / np.abs(weight.scales.reshape(96, 4))
    assert steps.max() <= (0.5 + 1e-3 if method == "rtn" and not symmetric else 1.0 + 1e-3)


@pytest.mark.parametrize("block_size,k,word", [(48, 96, "power of two"), (8, 64, "power of two"), (64, 96, "does not divide")])
def test_bad_block_size_is_a_usage_error(block_size, k, word):
    with pytest.raises(UsageError, match=word) as info:
        quantize_weight(np.zeros((4, k), np.float32), block_size=block_size)
    assert "\n" not in str(info.value) and "use" in str(info.value)


def test_unpermute_is_a_row_permutation_of_the_carrier():
    from gguf.constants import GGMLQuantizationType

    from compressor.sources.gguf_codes import GGUFTensor, to_nbits

    rng = np.random.default_rng(3)
    n, k, heads = 16, 64, 2
    blocks = np.zeros((n * k // 32, 34), np.uint8)
    blocks[:, :2] = np.ascontiguousarray(rng.uniform(0.01, 0.1, (n * k // 32, 1)).astype(np.float16)).view(np.uint8)
    blocks[:, 2:] = rng.integers(0, 256, (n * k // 32, 32))
    raw = GGUFTensor("blk.0.attn_q.weight", GGMLQuantizationType.Q8_0, n, k, blocks.reshape(n, -1))
    permuted = GGUFTensor("blk.0.attn_q.weight", GGMLQuantizationType.Q8_0, n, k, blocks.reshape(n, -1), heads)
    w = raw.dequantize()
    dim = n // heads // 2  # transformers' reverse_permute
    expected = w.reshape(heads, dim, 2, k).swapaxes(2, 1).reshape(n, k)
    np.testing.assert_array_equal(permuted.dequantize(), expected)
    np.testing.assert_array_equal(to_nbits(permuted).dequantize(), expected)


GGUF_TYPES = {"Q4_0": (32, 18, [0]), "Q4_1": (32, 20, [0, 2]), "Q8_0": (32, 34, [0]), "Q5_0": (32, 22, [0]),
              "Q5_1": (32, 24, [0, 2]), "Q4_K": (256, 144, [0, 2]), "Q5_K": (256, 176, [0, 2]), "Q6_K": (256, 210, [208])}


@pytest.mark.parametrize("type_name", sorted(GGUF_TYPES))
def test_every_carried_gguf_type_reproduces_gguf_dequantization(type_name):
    """Random block bytes (with sane float16 scales, and one all-zero-scale block) decode to gguf-py's values."""
    from gguf.constants import GGMLQuantizationType

    from compressor.sources.gguf_codes import GGUFTensor, to_nbits

    qk, size, f16_at = GGUF_TYPES[type_name]
    rng = np.random.default_rng(len(type_name) + size)
    n, k = 8, 512
    blocks = rng.integers(0, 256, (n * k // qk, size)).astype(np.uint8)
    for at in f16_at:
        blocks[:, at:at + 2] = np.ascontiguousarray(rng.uniform(-0.02, 0.05, (len(blocks), 1)).astype(np.float16)).view(np.uint8)
    blocks[3, f16_at[0]:f16_at[0] + 2] = 0  # a block whose scale is zero (Q4_1 / Q5_1: w = m throughout)
    t = GGUFTensor("blk.0.ffn_up.weight", GGMLQuantizationType[type_name], n, k, blocks.reshape(n, -1))
    if type_name in ("Q5_1", "Q5_K"):  # 8-bit float zero points: only for a lowering that splits them off
        assert to_nbits(t) is None
    weight = to_nbits(t, split_zero_points=True)
    ref = t.dequantize()
    assert np.abs(weight.dequantize() - ref).max() <= 1e-6 * np.abs(ref).max()
    if type_name in ("Q4_0", "Q8_0", "Q5_0", "Q6_K"):
        np.testing.assert_array_equal(weight.dequantize(), ref)
    assert_runs_as(weight, ref)


def test_gguf_header_reader_agrees_with_gguf_py(tmp_path):
    """read_gguf_linears parses the header itself (GGUFReader is ~45 s on Gemma 3's vocabulary): same tensors."""
    import gguf

    from compressor.sources.gguf_codes import match_linears, read_gguf_linears, to_nbits

    rng = np.random.default_rng(5)
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_token_list([f"tok{i}" for i in range(300)])
    floats = {"blk.0.attn_q.weight": (64, 64, "Q4_0"), "blk.0.attn_k.weight": (32, 64, "Q8_0"),
              "blk.0.ffn_up.weight": (48, 64, "Q4_1"), "blk.0.ffn_down.weight": (64, 48, "F32")}
    for name, (n, k, qtype) in floats.items():
        w = rng.standard_normal((n, k)).astype(np.float32)
        q = gguf.GGMLQuantizationType[qtype]
        writer.add_tensor(name, gguf.quants.quantize(w, q), raw_dtype=q)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    mine = read_gguf_linears(path)
    reader = gguf.GGUFReader(str(path))
    two_d = [t for t in reader.tensors if len(t.shape) == 2]
    assert sorted(mine) == sorted(t.name for t in two_d)
    for t in two_d:
        m = mine[t.name]
        assert m.qtype == t.tensor_type and (m.k, m.n) == tuple(int(d) for d in t.shape)
        np.testing.assert_array_equal(np.asarray(m.data), np.ascontiguousarray(t.data).view(np.uint8).reshape(m.n, -1))
    assert mine["blk.0.attn_q.weight"].heads == 4 and mine["blk.0.attn_k.weight"].heads == 2 and mine["blk.0.ffn_up.weight"].heads is None
    assert to_nbits(mine["blk.0.ffn_down.weight"]) is None  # F32: nothing to carry; the caller quantizes it
    # by content: the un-permuted q / k (as transformers loads them) and renamed keys match; a changed weight does not
    named = {"a.q": mine["blk.0.attn_q.weight"].dequantize(), "b.k": mine["blk.0.attn_k.weight"].dequantize(),
             "c.up": mine["blk.0.ffn_up.weight"].dequantize() * 1.5, "d.down": mine["blk.0.ffn_down.weight"].dequantize(),
             "e.raw_q": mine["blk.0.attn_q.weight"].dequantize(unpermute=False)}
    carried = match_linears(path, named)
    assert sorted(carried) == ["a.q", "b.k"]
    np.testing.assert_array_equal(carried["a.q"].dequantize(), named["a.q"])


@pytest.mark.parametrize("minimums,ops,rtol", [("fp32", ["MatMul", "MatMulNBits", "MatMul", "Add"], 1e-5),
                                                ("int8", ["MatMulNBits", "Concat", "MatMulNBits"], 1e-2)])
def test_split_lowering_takes_batched_inputs_and_bias(minimums, ops, rtol):
    """Float zero points (HQQ here) run as the symmetric kernel plus the block minimums' term: exactly (fp32) or as
    two 4-bit digits inside the kernel (int8); any rank of x, with a bias."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(4)
    n, k = 40, 128
    weight = quantize_weight(rng.standard_normal((n, k)).astype(np.float32), 4, 32, symmetric=False, method="hqq")
    bias = rng.standard_normal(n).astype(np.float32)
    nodes, inits, out = matmul_nbits_node("x", weight, "w", bias=bias, minimums=minimums)
    assert sorted(node.op_type for node in nodes) == sorted(ops)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["b", "s", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref = x @ weight.dequantize().T + bias
    assert np.abs(got - ref).max() <= rtol * np.abs(ref).max(), (minimums, np.abs(got - ref).max(), np.abs(ref).max())


# --- the example checkpoints ---------------------------------------------------------------------------------


def _linear_weights(spec: str) -> dict[str, np.ndarray]:
    import torch

    from compressor.sources.source import load_source

    adapter, _info = load_source(spec)
    weights = {}
    for name, module in adapter.model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            weights[name] = module.weight.detach().float().numpy()
    return weights


@pytest.mark.slow
def test_smollm2_every_linear_and_the_tied_head_carry_exactly():
    from compressor.sources.examples import example_folder
    from compressor.sources.gguf import source_gguf
    from compressor.sources.gguf_codes import match_linears, read_gguf_linears

    gguf = source_gguf(example_folder("smollm2"))
    assert gguf is not None and gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    weights = _linear_weights("example:smollm2")
    carried = match_linears(gguf, weights)
    assert set(carried) == set(weights), sorted(set(weights) - set(carried))[:5]
    assert "lm_head" in carried and carried["lm_head"].origin == "gguf Q8_0 (exact)"
    assert {w.origin for name, w in carried.items() if name not in ("lm_head", "model.embed_tokens")} == {"gguf Q4_1 (exact)"}
    tensors = read_gguf_linears(gguf)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.7.self_attn.k_proj", "model.layers.29.mlp.down_proj", "lm_head"):
        w, weight = weights[name], carried[name]
        np.testing.assert_allclose(weight.dequantize(), w, rtol=0, atol=1e-6 * np.abs(w).max())
        assert_runs_as(weight, w)
    q_weights = [t for t in tensors.values() if ".attn_q." in t.name]
    assert q_weights and all(t.heads == 9 for t in q_weights)  # un-permuted with SmolLM2's 9 heads


@pytest.mark.slow
def test_gemma3_types_and_carriers(capsys):
    from collections import Counter

    from compressor.sources.examples import example_folder
    from compressor.sources.gguf import source_gguf
    from compressor.sources.gguf_codes import exact_type, match_linears, read_gguf_linears, to_nbits

    gguf = source_gguf(example_folder("gemma3-270m"))
    assert gguf is not None and gguf.name == "gemma-3-270m-q4_k_m.gguf"
    tensors = read_gguf_linears(gguf)
    kinds = Counter((name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0], t.type_name) for name, t in tensors.items())
    weights = _linear_weights("example:gemma3-270m")
    carried = match_linears(gguf, weights)
    with capsys.disabled():
        print("\nGemma 3 270M Q4_K_M 2-D tensor types:", dict(sorted(kinds.items())))
        print(f"carried exactly: {len(carried)} of {len(weights)}:", dict(Counter(w.origin for w in carried.values())))
    one_per_type = {t.type_name: t for t in tensors.values() if exact_type(t) and t.name.startswith("blk.")}
    assert set(one_per_type) == {"Q4_K", "Q5_0", "Q6_K", "Q8_0"}
    for t in one_per_type.values():  # each carrier reproduces gguf-py's dequantization
        ref, got = t.dequantize(), to_nbits(t).dequantize()
        assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max(), t.name
        if t.type_name != "Q4_K":  # no zero point divided out: bit for bit
            np.testing.assert_array_equal(got, ref)
    assert set(carried) == set(weights)  # every linear, the embedding and the tied head: all types here carry
    assert carried["lm_head"].origin == "gguf Q8_0 (exact)"
    name = next(n for n in carried if n.endswith("down_proj"))
    assert_runs_as(carried[name], weights[name])


def test_source_gguf_follows_the_record_and_the_example_cache(tmp_path, monkeypatch):
    import json

    from compressor.sources import gguf as gguf_source
    from compressor.runtime.artifact import sha256_of

    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + bytes(60))
    folder = tmp_path / "converted"
    folder.mkdir()
    record = {"gguf_file": model.name, "gguf_sha256": sha256_of(model)}
    (folder / gguf_source.RECORD).write_text(json.dumps(record))  # converted before paths were recorded
    assert gguf_source.source_gguf(folder) is None
    gguf_source._record_path(folder, model)  # what converted_folder does when it finds the conversion cached
    assert gguf_source.source_gguf(folder) == model.resolve()
    assert gguf_source.conversion_record(folder) == record  # manifests keep name and sha256 only
    model.write_bytes(b"GGUF" + bytes(61))  # changed since: not the file the folder came from
    assert gguf_source.source_gguf(folder) is None
    assert gguf_source.source_gguf(tmp_path) is None  # an ordinary folder


def test_source_gguf_recognises_the_example_cache_folders(monkeypatch, tmp_path):
    from compressor.sources import examples, gguf as gguf_source

    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path))
    monkeypatch.setattr(examples, "example_gguf", lambda name: tmp_path / "raw" / examples.GGUF_EXAMPLES[name])
    assert gguf_source.source_gguf(tmp_path / "models" / "gemma3-270m") == tmp_path / "raw" / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"
    assert gguf_source.source_gguf(tmp_path / "models" / "minilm") is None
