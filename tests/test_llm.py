"""SliceGPT on the real SmolLM2, decoder export with a KV cache, and torch-free generation."""

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from compressor.errors import UsageError
from compressor.program.handle import load
from compressor.sources.lm_data import held_out_windows, torch_perplexity
from compressor.pipeline.pass_manager import Pipeline
from compressor.passes import SliceGPT
from compressor.validation.lm import program_logits

from .conftest import build, compress

pytestmark = pytest.mark.slow  # SmolLM2-135M: SliceGPT passes, perplexity windows, ONNX exports

SMALL_SLICE = {"name": "slicegpt", "sparsity": 0.25, "calibration_samples": 8, "calibration_len": 256,
               "normalize_tokens": True}


@pytest.fixture(scope="module")
def windows():
    handle = load("example:smollm2")
    return held_out_windows(handle.adapter.tokenizer_file, 256, 2)


def perplexity(handle, windows):
    return torch_perplexity(program_logits(handle.program(), handle.adapter), windows)


def test_decoder_program_matches_transformers_with_cache():
    handle = load("example:smollm2")
    ad = handle.adapter
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])
    from compressor.program.decoder import prefill_inputs

    with torch.no_grad():
        ref = ad.reference_logits(ids)
        out = handle.program()(*prefill_inputs(ad, ids[:, :4]))
        assert torch.allclose(out[0], ref[:, :4], atol=1e-3)
        mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1]])
        step = handle.program()(ids[:, 4:], mask, *out[1:])  # two more tokens through the cache
    assert torch.allclose(step[0], ref[:, 4:], atol=1e-3)


def test_folding_alone_keeps_perplexity(windows):
    handle = load("example:smollm2")
    dense = perplexity(handle, windows)
    Pipeline([SliceGPT(sparsity=0.0)]).run(handle)
    assert f"{perplexity(handle, windows):.4g}" == f"{dense:.4g}"
    assert all(bool((l.attn_norm.weight == 1).all()) for l in handle.adapter.layers)


def test_portable_slicing_is_a_stock_llama(tmp_path, windows):
    from transformers import AutoModelForCausalLM

    handle = load("example:smollm2")
    dense = perplexity(handle, windows)
    Pipeline([SliceGPT(**{k: v for k, v in SMALL_SLICE.items() if k != "name"})]).run(handle)
    ad = handle.adapter
    assert ad.config.hidden_size == 432 and ad.embed_tokens.weight.shape == (49152, 432)
    assert ad.layers[0].q.weight.shape == (576, 432) and ad.layers[0].o.weight.shape == (432, 576)
    assert ad.layers[0].fc_out.weight.shape == (432, 1536) and ad.lm_head.weight.shape == (49152, 432)
    assert torch.allclose(ad.final_norm_module.weight, torch.full((432,), math.sqrt(576 / 432)))
    info = handle.history[0]["info"]
    assert info["width_after"] == 432 and info["params_after"] < info["params_before"]
    sliced = perplexity(handle, windows)
    assert dense < sliced < 20 * dense  # lossy, but a language model still
    ad.model.save_pretrained(str(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM" and reloaded.config.hidden_size == 432
    ids = torch.from_numpy(windows[:1, :64])
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, ad.reference_logits(ids), atol=1e-4)


def test_per_layer_mode_matches_the_reference_architecture(windows):
    handle = load("example:smollm2")
    dense = perplexity(handle, windows)
    Pipeline([SliceGPT(sparsity=0.25, mode="per_layer", calibration_samples=8, calibration_len=256)]).run(handle)
    ad = handle.adapter
    info = handle.history[0]["info"]
    # the reference's parameter count at 25%: shortcut matrices added, LM head input left at full width
    assert info["params_after"] == 140_678_784 and not ad.transformers_loadable
    assert ad.layers[0].layer.attn_shortcut.weight.shape == (432, 432)
    assert ad.layers[-1].layer.mlp_shortcut.weight.shape == (576, 432) and ad.lm_head.weight.shape == (49152, 576)
    assert dense < perplexity(handle, windows) < 20 * dense


def test_spectrum_widths_give_spread_spectra_more_width():
    from compressor.passes.slicegpt.slice_schedule import lost_energy, spectrum_widths

    steep = torch.tensor([0.5 ** i for i in range(64)])  # variance in a few directions
    flat = torch.ones(64)  # variance spread evenly
    widths = spectrum_widths([steep, flat, steep], target=32, round_to=8, low=16, high=64)
    assert sum(widths) == 96 and all(w % 8 == 0 and 16 <= w <= 64 for w in widths)
    assert widths[1] > 32 > widths[0] == widths[2]
    total = sum(lost_energy(v, w) for v, w in zip([steep, flat, steep], widths))
    assert total < 2 * lost_energy(steep, 32) + lost_energy(flat, 32)  # beats the uniform schedule
    with pytest.raises(ValueError, match="round_to-aligned"):
        spectrum_widths([flat], target=30, round_to=8, low=16, high=64)


def test_per_layer_spectrum_schedule(windows):
    from compressor.passes.slicegpt import boundary_spectra

    handle = load("example:smollm2")
    dense = perplexity(handle, windows)
    ids = torch.from_numpy(windows[:2, :64])
    spectra = boundary_spectra(handle.adapter, ids, 1)
    with torch.no_grad():
        states = handle.adapter.model(input_ids=ids, output_hidden_states=True).hidden_states
    for k in (0, 5):  # transformers' input to layer k is boundary 2k (embedding output, then after each block)
        x = states[k].reshape(-1, 576).double()
        x = x / x.norm(dim=-1, keepdim=True)  # per token normalised
        assert len(spectra) == 61 and torch.allclose(spectra[2 * k], torch.linalg.eigvalsh(x.T @ x).flip(0), rtol=1e-3, atol=1e-4)
    Pipeline([SliceGPT(sparsity=0.25, mode="per_layer", schedule="spectrum", calibration_samples=8,
                       calibration_len=256)]).run(handle)
    ad, info = handle.adapter, handle.history[0]["info"]
    widths = info["boundary_widths"]
    assert info["width_schedule"] == "spectrum" and len(widths) == 61 and widths[-1] == 576  # head input not sliced
    assert sum(widths[:-1]) == 60 * 432 and len(set(widths)) > 5
    assert ad.embed_tokens.weight.shape == (49152, widths[0])
    for j, layer in enumerate(ad.layers):
        a, m, out = widths[2 * j: 2 * j + 3]
        assert layer.q.weight.shape == (576, a) and layer.gate.weight.shape == (1536, m)
        assert layer.layer.attn_shortcut.weight.shape == (m, a) and layer.fc_out.weight.shape == (out, 1536)
        assert layer.attn_norm.weight.shape == (a,)
    assert ad.lm_head.weight.shape == (49152, 576)
    assert dense < perplexity(handle, windows) < 20 * dense
    with pytest.raises(UsageError, match="schedule = 'spectrum' needs mode = 'per_layer'"):
        SliceGPT(schedule="spectrum")
    with pytest.raises(UsageError, match="sparsity > 0"):
        SliceGPT(schedule="spectrum", mode="per_layer", sparsity=0.0)


def test_post_norm_models_are_refused():
    handle = load("example:minilm", batch=2, seq_len=16)
    with pytest.raises(UsageError, match="post-norm"):
        Pipeline([SliceGPT(sparsity=0.2)]).run(handle)


@pytest.fixture(scope="module")
def smol_artifact(tmp_path_factory):
    return build(tmp_path_factory.mktemp("lm"), "smol", "example:smollm2", [SMALL_SLICE], {}, samples=None,
                 perplexity_windows=2, window_len=256, max_perplexity_ratio=20.0, greedy_prompts=2, greedy_tokens=8)


def test_lm_artifact_manifest_and_agreement(smol_artifact):
    m = json.loads((smol_artifact / "manifest.json").read_text())
    v = m["validation"]
    assert v["passed"] and v["onnx_gap"] < 1e-3 and v["greedy_agreement"] >= 0.5
    assert m["params"]["compressed"] < m["params"]["dense"] == 134_515_040
    assert m["inputs"][0] == {"name": "input_ids", "shape": ["batch", "sequence"], "dtype": "int64"}
    assert "hf/model.safetensors" in m["files"] and m["preprocess"]["kind"] == "causal_lm"


def test_generation_is_torch_free(smol_artifact):
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "transformers", "onnx", "onnxscript"):
            sys.modules[name] = None
        from compressor.runtime import load
        lm = load({str(smol_artifact)!r})
        a = lm.generate("The capital of France is", max_new_tokens=6)
        b = lm.generate("The capital of France is", max_new_tokens=6)
        c = lm.generate("The capital of France is", max_new_tokens=6, temperature=0.8, top_p=0.9, seed=1)
        d = lm.generate("The capital of France is", max_new_tokens=6, temperature=0.8, top_p=0.9, seed=1)
        pieces = []
        e = lm.generate("Paris is", max_new_tokens=4, on_text=pieces.append)
        assert a == b and c == d and isinstance(a, str) and "".join(pieces) == e
        ids = lm.encode("Hello there")
        assert lm.logits(ids).shape == (len(ids), 49152)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_cache_decode_matches_full_prefill(smol_artifact):
    from compressor.runtime import load

    lm = load(smol_artifact)
    ids = lm.encode("The history of the Roman Empire")
    tokens = lm.generate(ids, max_new_tokens=5)
    full = lm.logits(ids + tokens[:-1])
    assert list(np.argmax(full[len(ids) - 1:], axis=-1)) == tokens


def test_eval_perplexity_cli(smol_artifact, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["The quick brown fox jumps over the lazy dog."] * 40))
    done = compress("eval", str(smol_artifact), "--perplexity", str(text), "--window-len", "128", "--windows", "1",
                    "--json", str(tmp_path / "ppl.json"))
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "ppl.json").read_text())
    assert result["windows"] == 1 and result["perplexity_dense"] > 1 and result["perplexity_compressed"] > 1


def test_dinov2_layernorm_folding_is_exact_and_slicing_composes_with_merging():
    from compressor.passes import TokenMerge

    from .conftest import SMALL_IMAGE

    handle = load("example:dinov2-small", **SMALL_IMAGE)
    inputs = handle.example_inputs()
    with torch.no_grad():
        dense = handle.program(dense=True)(*inputs)
    Pipeline([SliceGPT(sparsity=0.0)]).run(handle)
    with torch.no_grad():
        assert torch.allclose(handle.program(dense=True)(*inputs), dense, atol=1e-4)
    handle = load("example:dinov2-small", **SMALL_IMAGE)
    Pipeline([SliceGPT(sparsity=0.25, calibration_samples=8, normalize_tokens=True), TokenMerge(r=4)]).run(handle)
    sliced, merged = handle.history
    assert sliced["info"]["width_after"] == 288 and sliced["params_after"] < sliced["params_before"]
    assert merged["flops_after"] < merged["flops_before"] < sliced["flops_before"]
    with torch.no_grad():
        out = handle.program()(*inputs)
    assert out.shape == dense.shape == (2, 384)
    assert torch.nn.functional.cosine_similarity(out, dense).min() > 0.7


def test_dinov2_per_layer_slicing_equals_projecting_each_boundary():
    """per_layer slicing computes exactly the folded model with each boundary projected onto its kept directions
    (Q Q^T): rotations, shortcut matrices, rescaled norms and the final projection are right at any widths."""
    import copy

    from compressor.passes.slicegpt.pca import pca_keeping
    from compressor.passes.slicegpt import slice_boundaries

    from .conftest import SMALL_IMAGE

    handle = load("example:dinov2-small", **SMALL_IMAGE)
    pixels = handle.example_inputs()[0]
    handle.adapter.fold_norms()
    folded = copy.deepcopy(handle.adapter)
    rotations, kept = [], []
    pca = pca_keeping(0.01, kept)

    def recording_pca(moment, keep):
        rotations.append(pca(moment, keep))
        return rotations[-1]

    widths = [256, 200, 312, 256] * 6 + [248]  # uneven, and the last boundary (the final norm's input) sliced too
    slice_boundaries(handle.adapter, [pixels], widths, recording_pca, normalize=True)
    assert [q.shape[1] for q in rotations] == widths and handle.adapter.layers[0].layer.mlp_shortcut.weight.shape == (312, 200)
    images = pixels + 0.1 * torch.randn(pixels.shape, generator=torch.Generator().manual_seed(0))  # not the calibration
    with torch.no_grad():
        sliced = handle.program(dense=True)(images)
        project = iter([q @ q.T for q in rotations])
        x = folded.embed(images)[0] @ next(project)
        for layer in folded.layers:
            x = (x + layer.attention_out(x, torch.zeros(x.shape[:2]))[0]) @ next(project)
            x = (x + layer.mlp_out(x)) @ next(project)
        reference = folded.model.layernorm(x[:, 0])
    assert torch.allclose(sliced, reference, atol=1e-4)


def test_slicegpt_refuses_options_that_do_not_apply():
    from .conftest import SMALL_IMAGE

    handle = load("example:dinov2-small", **SMALL_IMAGE)
    # seed is no longer refused for images: it draws the calibration crops
    for options, message in (({"calibration_len": 64}, "calibration_len apply to language models"),
                             ({"calibration_samples": 60000}, "at most 4096"),
                             ({"tie_head": True, "mode": "portable"}, "DINOv2 has no LM head")):
        with pytest.raises(UsageError, match=message):
            Pipeline([SliceGPT(**options)]).run(handle)
    with pytest.raises(UsageError, match="slice_head applies to mode = 'per_layer'"):
        SliceGPT(slice_head=True)


def test_dinov2_per_layer_slicing_with_merging_exports_and_runs(tmp_path):
    """per_layer on DINOv2 (spectrum widths) then token merging, compiled and validated, embedded torch-free-style
    through the runtime loader."""
    from compressor.runtime import load as load_artifact

    from .conftest import SMALL_IMAGE, build

    slicing = {"name": "slicegpt", "sparsity": 0.25, "mode": "per_layer", "schedule": "spectrum",
               "calibration_samples": 8, "normalize_tokens": True}
    out = build(tmp_path, "dino", "example:dinov2-small", [slicing, {"name": "token_merge", "r": 4}], SMALL_IMAGE,
                # bars for the held-out natural photographs (mean 0.79, p5 0.57 measured; Fashion-MNIST gave more)
                samples=8, min_cosine_mean=0.75, min_cosine_p5=0.5, min_agreement=0.75)
    manifest = json.loads((out / "manifest.json").read_text())
    sliced = manifest["passes"][0]
    widths = sliced["info"]["boundary_widths"]
    assert len(widths) == 25 and widths[-1] == 384 and all(w % 8 == 0 and w <= 384 for w in widths[:-1])
    assert sum(widths[:-1]) == 24 * 288  # spectrum keeps the uniform schedule's total width
    assert sliced["info"]["shortcut_params"] > 0 and sliced["params_after"] < sliced["params_before"]
    model = load_artifact(out)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (60, 60), dtype=np.uint8) for _ in range(3)]
    assert model.embed_images(images).shape == (3, 384)


def test_cli_shows_an_lm_artifact(smol_artifact):
    from rich.console import Console

    from compressor.cli.app import _print_summary

    console = Console(record=True, width=200)
    _print_summary(console, json.loads((smol_artifact / "manifest.json").read_text()), smol_artifact)
    assert "perplexity" in console.export_text()
    done = compress("inspect", str(smol_artifact))
    assert done.returncode == 0, done.stderr
    assert "llama" in done.stdout and "greedy agreement" in done.stdout


def test_tied_head_slicing_then_distillation_keeps_a_stock_tied_llama(tmp_path, windows):
    """tie_head shares the embedding with the head again; distill lowers KL to the teacher and keeps the tie."""
    from transformers import AutoModelForCausalLM

    from compressor.passes import Distill

    handle = load("example:smollm2")
    options = {k: v for k, v in SMALL_SLICE.items() if k != "name"}
    Pipeline([SliceGPT(**{**options, "sparsity": 0.15, "tie_head": True})]).run(handle)
    ad = handle.adapter
    sliced = handle.history[0]
    assert ad.lm_head.weight is ad.embed_tokens.weight and ad.config.hidden_size == 488
    assert sliced["params_after"] < 0.85 * sliced["params_before"]  # the tie saves vocab x width parameters
    assert 0 < sliced["info"]["tied_head_logit_error"] < 1 and not sliced["info"]["lm_head_untied"]
    before = {n: p.clone() for n, p in ad.model.named_parameters()}
    Pipeline([Distill(steps=3, batch=2, seq_len=64, lr=1e-4, warmup=0.0, eval_windows=2, device="cpu")]).run(handle)
    info = handle.history[1]["info"]
    assert info["steps"] == 3 and info["tokens"] == 3 * 2 * 64 and info["device"].startswith("cpu")
    assert info["eval_kl_after"] < info["eval_kl_before"]
    assert ad.lm_head.weight is ad.embed_tokens.weight  # the tie survives training
    assert all(not p.requires_grad for p in ad.model.parameters()) and not ad.model.training
    assert all(not torch.equal(p, before[n]) for n, p in ad.model.named_parameters())
    assert handle.history[1]["params_after"] == sliced["params_after"]
    ad.model.save_pretrained(str(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    ids = torch.from_numpy(windows[:1, :64])
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, ad.reference_logits(ids), atol=1e-4)


def test_recovery_options_are_checked():
    from compressor.passes import Distill

    with pytest.raises(UsageError, match="tie_head needs mode = 'portable'"):
        SliceGPT(tie_head=True, mode="per_layer")
    with pytest.raises(UsageError, match="sparsity > 0"):
        SliceGPT(tie_head=True, sparsity=0.0)
    with pytest.raises(UsageError, match="device must be"):
        Distill(device="tpu")
    handle = load("example:minilm", batch=2, seq_len=16)
    with pytest.raises(UsageError, match="seq_len apply to language models only"):
        Pipeline([Distill(steps=1, seq_len=64)]).run(handle)
