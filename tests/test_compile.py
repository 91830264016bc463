"""Compiled artifacts: manifest contents, ONNX agreement, validation gates and atomic publishing."""

import json

import numpy as np
import pytest

from compressor.errors import UsageError, ValidationFailed
from compressor.runtime import load
from compressor.runtime.artifact import hash_folder

from .conftest import SMALL_TEXT, build

pytestmark = pytest.mark.slow  # every test exports MiniLM or DINOv2 to ONNX


def test_manifest_has_what_replay_and_audit_need(minilm_artifact):
    m = json.loads((minilm_artifact / "manifest.json").read_text())
    assert m["format"] == {"name": "compressor-artifact", "version": 1}
    assert m["source"]["spec"] == "example:minilm" and len(m["source"]["weights_sha256"]) == 64
    assert m["inputs"] == [{"name": "input_ids", "shape": [4, 64], "dtype": "int64"},
                           {"name": "attention_mask", "shape": [4, 64], "dtype": "int64"}]
    assert m["outputs"][0]["shape"] == [4, 384]
    assert m["passes"][0]["name"] == "token_merge" and m["passes"][0]["options"]["r"] == 8
    assert m["token_plan"]["token_counts"] == [64, 56, 48, 40, 32, 24, 16]
    assert m["flops"]["compressed"] < m["flops"]["dense"] and m["flops"]["ratio"] > 1.3
    assert m["params"]["dense"] == m["params"]["compressed"]
    assert set(m["versions"]) >= {"torch", "onnx", "onnxruntime", "transformers"}
    assert m["files"] == hash_folder(minilm_artifact)
    assert {"model.onnx", "tokenizer.json"} <= set(m["files"])
    v = m["validation"]
    assert v["passed"] and v["samples"] == 16 and v["cosine_to_dense_mean"] > 0.9  # texts filling 64 tokens
    assert v["onnx_vs_torch_agreement"] >= 0.95
    assert m["recipe"]["passes"][0]["name"] == "token_merge"


def test_artifact_matches_its_validation_on_fresh_text(minilm_artifact):
    model = load(minilm_artifact)
    emb = model.embed(["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell sharply."])
    assert emb.shape == (3, 384)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2], "paraphrases stay closer than unrelated text"


def test_dinov2_artifact(dinov2_artifact):
    m = json.loads((dinov2_artifact / "manifest.json").read_text())
    assert m["token_plan"]["token_counts"][0] == 65 and m["preprocess"]["kind"] == "image"
    assert m["validation"]["passed"] and m["validation"]["cosine_to_dense_mean"] > 0.95


def test_failed_validation_publishes_nothing(tmp_path):
    with pytest.raises(ValidationFailed, match="nothing published"):
        build(tmp_path, "strict", "example:minilm", [{"name": "token_merge", "r": 30}], SMALL_TEXT,
              samples=8, min_cosine_mean=0.99999)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="already exists"):
        build(tmp_path, "taken", "example:minilm", [], SMALL_TEXT, samples=4)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
