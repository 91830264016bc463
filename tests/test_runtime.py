"""The torch-free runtime: loads only verified artifacts, checks feeds, and runs with torch unimportable."""

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from compressor.runtime import FeedError, RuntimeArtifactError, load


@pytest.fixture()
def copy_of(tmp_path, minilm_artifact):
    dest = tmp_path / "copy"
    shutil.copytree(minilm_artifact, dest)
    return dest


def test_runtime_works_with_torch_unimportable(minilm_artifact, dinov2_artifact):
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "transformers", "onnx", "onnxscript"):
            sys.modules[name] = None  # any import of these now raises ImportError
        import numpy as np
        from compressor.runtime import load
        m = load({str(minilm_artifact)!r})
        e = m.embed(["hello world", "a second sentence", "three", "four", "and a fifth one"])
        assert e.shape == (5, 384) and np.isfinite(e).all()
        v = load({str(dinov2_artifact)!r})
        img = (np.arange(28 * 28) % 255).astype(np.uint8).reshape(28, 28)
        f = v.embed_images([img, img, img])
        assert f.shape == (3, 384) and np.isfinite(f).all()
        assert not any(k.startswith("torch") and sys.modules[k] is not None for k in sys.modules)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_tampered_file_is_refused(copy_of):
    with open(copy_of / "tokenizer.json", "a") as f:
        f.write(" ")
    with pytest.raises(RuntimeArtifactError, match="tokenizer.json.*SHA-256"):
        load(copy_of)


def test_truncated_model_is_refused(copy_of):
    data = (copy_of / "model.onnx").read_bytes()
    (copy_of / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeArtifactError, match="model.onnx"):
        load(copy_of)


def test_missing_file_and_unknown_format_are_refused(copy_of):
    manifest = json.loads((copy_of / "manifest.json").read_text())
    (copy_of / "vocab.txt").unlink()
    with pytest.raises(RuntimeArtifactError, match="missing"):
        load(copy_of)
    manifest["format"]["version"] = 99
    (copy_of / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RuntimeArtifactError, match="version 99"):
        load(copy_of)


def test_not_an_artifact(tmp_path):
    with pytest.raises(RuntimeArtifactError, match="no manifest.json"):
        load(tmp_path)
    with pytest.raises(RuntimeArtifactError, match="does not exist"):
        load(tmp_path / "nope")


def test_feeds_are_checked(minilm_artifact):
    m = load(minilm_artifact)
    good = {"input_ids": np.zeros((4, 64), np.int64), "attention_mask": np.ones((4, 64), np.int64)}
    assert m.run(good)["pooled"].shape == (4, 384)
    with pytest.raises(FeedError, match="shape"):
        m.run({**good, "input_ids": np.zeros((4, 32), np.int64)})
    with pytest.raises(FeedError, match="dtype"):
        m.run({**good, "attention_mask": np.ones((4, 64), np.int32)})
    with pytest.raises(FeedError, match="missing"):
        m.run({"input_ids": good["input_ids"]})
    with pytest.raises(FeedError, match="embed_images"):
        m.embed_images([np.zeros((8, 8), np.uint8)])
    with pytest.raises(FeedError, match="list of strings"):
        m.embed("not a list")


def test_batches_are_padded_and_split(minilm_artifact):
    m = load(minilm_artifact)
    texts = [f"sentence number {i} about the weather" for i in range(9)]
    all_at_once = m.embed(texts)
    one_by_one = np.concatenate([m.embed([t]) for t in texts])
    assert all_at_once.shape == (9, 384)
    assert np.allclose(all_at_once, one_by_one, atol=1e-5)
