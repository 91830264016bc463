"""The fused decoder lowering (GroupQueryAttention, SkipSimplifiedLayerNormalization, MatMulNBits) against the
PyTorch program, the in-place KV decoding of the runtime, GGUF codes carried into 4-bit graphs, and one-line
refusals of options that cannot apply."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from compressor.errors import UsageError
from compressor.lower.decoder_deploy import WeightPlan, lowering_options, rounded_zero_points
from compressor.lower.fused_decoder import LoweringOptions, fused_refusal, lower_decoder
from compressor.lower.optimize import export_options
from compressor.program.decoder import DecoderProgram, prefill_inputs
from compressor.runtime.decode import SharedKVDecoder
from compressor.sources.source import load_source

from .test_decoder_families import make_model

FUSED_FAMILIES = ("qwen2", "qwen3", "mistral", "gemma3")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fused")
    return {f: make_model(f, root / f) for f in FUSED_FAMILIES + ("phi3",)}


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def graph_logits(sess, ids: np.ndarray) -> np.ndarray:
    feeds = {"input_ids": ids, "attention_mask": np.ones(ids.shape, np.int64)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values"):
            feeds[i.name] = np.zeros((ids.shape[0], i.shape[1], 0, i.shape[3]), np.float32)
    return sess.run(["logits"], feeds)[0]


def torch_logits(ad, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return DecoderProgram(ad)(*prefill_inputs(ad, torch.from_numpy(ids)))[0].numpy()


def kv_heads(sess) -> list[int]:
    return [i.shape[1] for i in sess.get_inputs() if i.name.endswith(".key")]


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_fused_graph_matches_the_program_prefill_and_in_place_decode(small, family, tmp_path):
    """Prefill logits equal the PyTorch program's past the sliding window (6 here), and decoding token by token over
    the shared KV buffer gives the logits of a full prefill at every position."""
    ad, _ = load_source(str(small[family]))
    info = lower_decoder(ad, tmp_path / "m.onnx", LoweringOptions(max_length=64))
    assert info["ops"]["GroupQueryAttention"] == len(ad.layers) and "SkipSimplifiedLayerNormalization" in info["ops"]
    sess = session(tmp_path / "m.onnx")
    ids = np.random.default_rng(0).integers(0, ad.config.vocab_size, (1, 20))
    ref = torch_logits(ad, ids)
    assert np.abs(graph_logits(sess, ids) - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())
    dec = SharedKVDecoder(sess, kv_heads(sess), ad.head_dim, 1, 64)
    steps = [dec.prefill([ids[0, :8].tolist()], chunk=3)]  # 3 chunks: 3 + 3 + 2 tokens
    steps += [dec.step(ids[0, t:t + 1]) for t in range(8, 20)]
    assert np.abs(np.stack([s[0] for s in steps]) - ref[0, 7:20]).max() < 1e-3 * max(1.0, np.abs(ref).max())


def test_batched_right_padded_decoding_equals_one_row_at_a_time(small, tmp_path):
    ad, _ = load_source(str(small["mistral"]))
    lower_decoder(ad, tmp_path / "m.onnx", LoweringOptions(max_length=64))
    sess = session(tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 1000, n).tolist() for n in (5, 11, 8)]
    nxt = np.array([7, 9, 11])
    batch = SharedKVDecoder(sess, kv_heads(sess), ad.head_dim, 3, 64)
    first = batch.prefill(prompts, chunk=256)
    second = batch.step(nxt)
    for b, p in enumerate(prompts):
        one = SharedKVDecoder(sess, kv_heads(sess), ad.head_dim, 1, 64)
        assert np.allclose(one.prefill([p], 256)[0], first[b], atol=1e-4)
        assert np.allclose(one.step(nxt[b:b + 1])[0], second[b], atol=1e-4)


def test_too_long_a_generation_is_one_line(small, tmp_path):
    from compressor.runtime.errors import FeedError

    ad, _ = load_source(str(small["qwen2"]))
    lower_decoder(ad, tmp_path / "m.onnx", LoweringOptions(max_length=16))
    sess = session(tmp_path / "m.onnx")
    dec = SharedKVDecoder(sess, kv_heads(sess), ad.head_dim, 1, 16)
    with pytest.raises(FeedError, match="holds 16"):
        dec.prefill([list(range(17))], 256)


def test_partial_rotary_below_the_kernels_minimum_is_refused_or_falls_back(small):
    """Phi-3 here rotates 8 of 16 channels; GroupQueryAttention needs a multiple of 16: the fused lowering says so
    (lowering = "auto" then takes the generic graph, exercised by the families' compile tests)."""
    ad, _ = load_source(str(small["phi3"]))
    assert "multiple of 16" in fused_refusal(ad)
    assert fused_refusal(load_source(str(small["qwen2"]))[0]) is None


class Handle:
    def __init__(self, adapter):
        self.adapter = adapter


def test_requantized_weights_and_refusals(small, tmp_path):
    ad, _ = load_source(str(small["qwen2"]))
    plan = WeightPlan(Handle(ad), export_options({"weights": "int8", "accuracy_level": 4, "keep_fp32": ["lm_head"]}))
    lower_decoder(ad, tmp_path / "q.onnx", LoweringOptions(max_length=64, weights=plan, accuracy_level=4))
    record = plan.record()
    assert record["gguf_source"] is None and record["kept_fp32"] == ["lm_head"]
    assert set(record["origins"]) == {"rtn 8-bit sym", "fp32 (kept)"}
    ids = np.random.default_rng(2).integers(0, ad.config.vocab_size, (1, 12))
    ref = torch_logits(ad, ids)
    got = graph_logits(session(tmp_path / "q.onnx"), ids)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()  # 8-bit weights, int8 activations
    with pytest.raises(UsageError, match="gguf = \"exact\" needs a GGUF source"):
        WeightPlan(Handle(ad), export_options({"weights": "int4", "gguf": "exact"}))
    with pytest.raises(UsageError, match="block_size = 128 does not divide"):  # width 64
        WeightPlan(Handle(ad), export_options({"weights": "int4", "block_size": 128}))


@pytest.mark.parametrize("raw, message", [
    ({"weights": "int3"}, "weights must be one of"),
    ({"block_size": 48}, "power of two"),
    ({"accuracy_level": 7}, "accuracy_level must be"),
    ({"lowering": "generic", "weights": "int4"}, "applies to the fused lowering"),
    ({"lowering": "fused", "quantize": "int8-dynamic"}, "use weights ="),
    ({"gguf": "maybe"}, "gguf must be one of"),
    ({"keep_fp32": "lm_head"}, "keep_fp32 must be a list"),
    ({"minimums": "int4"}, "minimums must be one of"),
    ({"head_topk": -1}, "head_topk must be an integer"),
    ({"head_topk": 64}, "head_topk shapes 4/8-bit weights"),
    ({"weights": "int4", "lowering": "generic", "head_topk": 64}, "applies to the fused lowering"),
])
def test_export_options_are_one_line(raw, message):
    with pytest.raises(UsageError, match=message) as e:
        export_options(raw)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_smollm2_gguf_codes_make_an_exact_4bit_graph(tmp_path):
    """SmolLM2's Q4_1 linears and Q8_0 tied head/embedding are carried as they are: the 4-bit graph (float compute)
    gives the dequantized model's logits to float rounding; with rounded zero points it does not."""
    ad, _ = load_source("example:smollm2")
    exact = WeightPlan(Handle(ad), export_options({"weights": "int4", "gguf": "exact"}))
    info = lower_decoder(ad, tmp_path / "q.onnx", LoweringOptions(max_length=256, weights=exact))
    record = exact.record()
    assert record["origins"] == {"gguf Q4_1 (exact)": 210, "gguf Q8_0 (exact)": 1}
    assert info["ops"]["GatherBlockQuantized"] == 1 and info["ops"]["Gather"] == 1  # the mask width only
    ids = np.random.default_rng(3).integers(0, ad.config.vocab_size, (1, 24))
    ref = torch_logits(ad, ids)
    assert np.abs(graph_logits(session(tmp_path / "q.onnx"), ids) - ref).max() < 1e-3 * np.abs(ref).max()
    assert (tmp_path / "q.onnx").stat().st_size < 120e6  # 4-bit linears, one 8-bit table for embedding and head
    rounded = rounded_zero_points(exact.carried["layers.0.q_proj"])
    assert rounded.zero_points.dtype == np.uint8
    assert not np.allclose(rounded.dequantize(), exact.carried["layers.0.q_proj"].dequantize(), atol=1e-6)


@pytest.mark.slow
def test_smollm2_fast_minimums_and_topk_head_keep_the_exact_logits_that_matter(tmp_path):
    """minimums = "int8" (Q4_1 minimums as 4-bit digits inside the kernel) and head_topk (a 4-bit draft head, each
    position's top k recomputed from the Q8_0 codes): greedy tokens are the dequantized model's, and the likeliest
    logits stay within the minimums' rounding of it (measured: 0.34 at most, logits up to 32) where the draft ranked
    them in its top k."""
    ad, _ = load_source("example:smollm2")
    options = export_options({"weights": "int4", "minimums": "int8", "head_topk": 64})
    plan = WeightPlan(Handle(ad), options)
    info = lower_decoder(ad, tmp_path / "fast.onnx", lowering_options(options, plan))
    assert "Add" not in info["ops"] and info["ops"]["Concat"] == 4 * len(ad.layers)  # [x, block sums] per input
    assert info["ops"]["TopK"] == 1 and info["ops"]["GatherBlockQuantized"] == 2  # embedding + top-k rows
    ids = np.random.default_rng(3).integers(0, ad.config.vocab_size, (1, 24))
    ref = torch_logits(ad, ids)[0]
    got = graph_logits(session(tmp_path / "fast.onnx"), ids)[0]
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95
    top = np.argsort(-ref, axis=-1)[:, :8]  # the likeliest tokens: refined, off only by the minimums' digits
    rows = np.arange(len(ids[0]))[:, None]
    close = np.abs(got[rows, top] - ref[rows, top]) < 0.02 * np.abs(ref).max()
    assert close.mean() >= 0.95, close.mean()  # the rest: a likely token the 4-bit draft ranked below its top 64
    draft = np.argsort(-got, axis=-1)[:, 64:]  # the tail keeps the 4-bit draft's values: further off, but there
    assert np.median(np.abs(got[rows, draft] - ref[rows, draft])) > np.median(np.abs(got[rows, top] - ref[rows, top]))


@pytest.mark.slow
def test_gemma3_gguf_types_are_carried_or_requantized(tmp_path):
    """Gemma 3 270M's Q4_K_M mixes Q4_K, Q5_0, Q6_K and Q8_0: all have exact MatMulNBits forms (8-bit for 5 and 6
    bits); the graph with float compute equals the PyTorch program, sliding windows and soft-capping included."""
    ad, _ = load_source("example:gemma3-270m")
    plan = WeightPlan(Handle(ad), export_options({"weights": "int4", "gguf": "exact"}))
    lower_decoder(ad, tmp_path / "q.onnx", LoweringOptions(max_length=256, weights=plan))
    assert sum(plan.record()["origins"].values()) == 7 * len(ad.layers) + 1
    ids = np.random.default_rng(4).integers(0, ad.config.vocab_size, (1, 16))
    ref = torch_logits(ad, ids)
    assert np.abs(graph_logits(session(tmp_path / "q.onnx"), ids) - ref).max() < 2e-3 * np.abs(ref).max()
    config = json.loads(json.dumps(plan.record()))  # the manifest's record is plain JSON
    assert config["bits"] == 4 and config["gguf_source"].endswith(".gguf")


@pytest.mark.slow
def test_pruned_model_compiles_to_a_validated_4bit_artifact_that_genai_config_describes(small, tmp_path):
    """Structure first, then weights: per-block head counts from width_prune and a removed block lower to the fused
    graph with 4-bit weights (re-quantized: the passes changed them); the runtime generates in a batch; a model whose
    blocks differ in head counts gets no genai_config.json, and the manifest says why."""
    from compressor.runtime import load as load_artifact

    from .conftest import build

    cal = {"calibration_samples": 4, "calibration_len": 64, "batch": 4}
    passes = [{"name": "width_prune", "params": 0.998, **cal},  # the tied 49152 x 64 embedding is most of the model
              {"name": "layer_prune", "blocks": 1, "keep_first": False, **cal}]
    out = build(tmp_path, "q", str(small["qwen3"]), passes, {"weights": "int4", "block_size": 16, "accuracy_level": 4},
                samples=None,
                perplexity_windows=1, window_len=64, max_perplexity_ratio=100.0, greedy_prompts=1, greedy_tokens=4,
                min_greedy_agreement=0.0)
    m = json.loads((out / "manifest.json").read_text())
    assert m["validation"]["passed"] and m["validation"]["onnx_gap"] < 1e-3
    assert m["export"]["lowering"]["ops"]["MatMulNBits"] >= 4 and m["preprocess"]["kv_cache"] == "shared"
    assert set(m["export"]["weights"]["origins"]) == {"rtn 4-bit sym"}
    genai = m["export"]["genai"]
    assert genai["written"] == (out / "genai_config.json").exists()
    lm = load_artifact(out)
    outs = lm.generate_batch([[5, 6, 7], [8, 9, 10, 11, 12]], max_new_tokens=3, stop_on_eos=False)
    assert [len(o) for o in outs] == [3, 3]
    assert outs[1] == lm.generate([8, 9, 10, 11, 12], max_new_tokens=3, stop_on_eos=False)
    from compressor.errors import ValidationFailed

    with pytest.raises(ValidationFailed, match="quantized graph's greedy agreement"):  # a bar no graph can pass
        build(tmp_path, "q2", str(small["qwen3"]), [], {"weights": "int4", "accuracy_level": 4}, samples=None,
              perplexity_windows=1, window_len=64, max_perplexity_ratio=100.0, greedy_prompts=1, greedy_tokens=4,
              min_greedy_agreement=0.0, min_quantized_agreement=1.01)
    assert not (tmp_path / "q2").exists()
