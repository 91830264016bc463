"""Deployment: honest baselines in bench, INT8 and fusions at export, validation on texts that fill the length."""

from __future__ import annotations

import json

import pytest

from compressor.errors import UsageError
from compressor.pipeline.recipe import recipe_from_dict
from tests.conftest import SMALL_TEXT, build

MERGE = [{"name": "token_merge", "r": 8}]
LOOSE = {"min_cosine_mean": 0.85, "min_cosine_p5": 0.7}  # r = 8 of 64 tokens per layer merges 75% of a full text


def test_export_options_are_checked_in_the_recipe():
    recipe = recipe_from_dict({"model": {"source": "example:minilm"},
                               "export": {"batch": 4, "fuse": True, "quantize": "int8-dynamic"}})
    assert recipe.export == {"batch": 4} and recipe.deploy == {"fuse": True, "quantize": "int8-dynamic"}
    assert recipe.to_dict()["export"] == {"batch": 4, "fuse": True, "quantize": "int8-dynamic"}
    with pytest.raises(UsageError, match="quantize must be one of"):
        recipe_from_dict({"model": {"source": "example:minilm"}, "export": {"quantize": "int4"}})
    with pytest.raises(UsageError, match="fuse must be true or false"):
        recipe_from_dict({"model": {"source": "example:minilm"}, "export": {"fuse": "yes"}})


@pytest.mark.slow
def test_validation_fills_the_length_and_counts_real_merges(minilm_artifact):
    v = json.loads((minilm_artifact / "manifest.json").read_text())["validation"]
    assert v["real_tokens_per_sample"] > 0.9 * SMALL_TEXT["seq_len"], "validation texts fill the compiled length"
    assert 0.5 < v["real_tokens_merged_fraction"] <= 48 / 64, "real tokens merged, not only padding"


@pytest.mark.slow
def test_int8_with_fusions_compiles_and_validates_the_shipped_graph(tmp_path):
    out = build(tmp_path, "q", "example:minilm", MERGE, {**SMALL_TEXT, "fuse": True, "quantize": "int8-dynamic"},
                samples=8, **LOOSE)
    m = json.loads((out / "manifest.json").read_text())
    assert m["export"]["steps"] == ["fuse", "int8-dynamic"] and m["export"]["validated_graph"] == "after fuse + int8-dynamic"
    assert m["export"]["quantization"]["quantized_ops"]["MatMulInteger"] >= 36  # every linear of 6 blocks
    assert m["export"]["fusion"]["fused"].get("SkipLayerNormalization", 0) + m["export"]["fusion"]["fused"].get("LayerNormalization", 0) > 0
    v = m["validation"]
    assert v["passed"] and v["graph"].startswith("shipped, quantized") and v["onnx_vs_torch_agreement"] >= 0.95
    assert 0.8 < v["cosine_to_unquantized_mean"] < 1.0
    assert set(m["files"]) == {p.name for p in out.iterdir() if p.name != "manifest.json"} and "model.fp32.onnx" not in m["files"]
    from compressor.runtime import load

    emb = load(out).embed(["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell."])
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2]


@pytest.mark.slow
def test_bench_has_honest_baselines(minilm_artifact):
    from compressor.measure.bench import bench_artifact

    r = bench_artifact(minilm_artifact, repeats=1, warmup=0, samples=4)
    assert set(r["distributions"]) == {"short", "paragraphs", "long"} and len(r["load_average"]) == 3
    short, long = r["distributions"]["short"], r["distributions"]["long"]
    assert short["real_tokens_mean"] < long["real_tokens_mean"] == 64 and short["real_tokens_max"] <= 64
    assert short["padded_tokens_dynamic"] < long["padded_tokens_dynamic"] == 4 * 64, "dynamic batches cut padding"
    for dist in r["distributions"].values():
        assert set(dist["baselines"]) == {"static", "dynamic", "fused", "fused_int8"}
        for name, row in dist["baselines"].items():
            assert row["ms"] > 0 and row["speedup"] == pytest.approx(row["ms"] / dist["compressed_ms"])
            assert row["cosine_to_dense"] > (0.98 if name == "fused_int8" else 0.9999), name  # the same function
    from compressor.measure.baseline_bench import BASELINE_COLUMNS, baseline_rows

    assert [len(row) for row in baseline_rows(r)] == [len(BASELINE_COLUMNS)] * 3
    fusion = r["distributions"]["short"]["baselines"]["fused"]["fusion"]
    assert fusion["model_type"] == "bert" and fusion["fused"].get("Attention", 0) + fusion["fused"].get("SkipLayerNormalization", 0) > 0
