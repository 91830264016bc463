"""The torch-free runtime: loads only verified artifacts, checks feeds, and runs with torch unimportable."""

import json
import re
import shutil
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import onnxruntime as ort
import pytest

from compressor.runtime import (FeedError, FeedTypeError, ProviderError, RuntimeArtifactError, TruncationWarning, load,
                                resolve_providers)
from compressor.runtime.lm import token_ids
from compressor.runtime.providers import full_name

MISSING_GPU = next((p for p in ("cuda", "tensorrt") if full_name(p) not in ort.get_available_providers()), None)


@pytest.fixture()
def copy_of(tmp_path, minilm_artifact):
    dest = tmp_path / "copy"
    shutil.copytree(minilm_artifact, dest)
    return dest


@pytest.mark.slow
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


@pytest.mark.slow
def test_tampered_file_is_refused(copy_of):
    with open(copy_of / "tokenizer.json", "a") as f:
        f.write(" ")
    with pytest.raises(RuntimeArtifactError, match="tokenizer.json.*SHA-256"):
        load(copy_of)


@pytest.mark.slow
def test_truncated_model_is_refused(copy_of):
    data = (copy_of / "model.onnx").read_bytes()
    (copy_of / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeArtifactError, match="model.onnx"):
        load(copy_of)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_batches_are_padded_and_split(minilm_artifact):
    m = load(minilm_artifact)
    texts = [f"sentence number {i} about the weather" for i in range(9)]
    all_at_once = m.embed(texts)
    one_by_one = np.concatenate([m.embed([t]) for t in texts])
    assert all_at_once.shape == (9, 384)
    assert np.allclose(all_at_once, one_by_one, atol=1e-5)


@pytest.mark.parametrize("call, fragment", [
    (lambda: load(123), "load() takes an artifact folder path"),
    (lambda: load(["out/minilm"]), "got list"),
    (lambda: load("out/x", threads="2"), "threads must be a positive int"),
    (lambda: load("out/x", providers=42), "providers must be a list"),
    (lambda: load("out/x", providers=[("cuda", "fast")]), "execution providers are names"),
    (lambda: load("out/x", allow_fallback="yes"), "allow_fallback must be True or False"),
    (lambda: token_ids("hello", "logits()"), "takes token ids"),
    (lambda: token_ids([1.5, 2.0], "logits()"), "integer token ids"),
    (lambda: token_ids([[1, 2], [3]], "logits()"), "token ids shaped"),
])
def test_wrong_types_are_refused_with_the_runtimes_error(call, fragment):
    """Refused before any file is read, as a FeedTypeError: the runtime's own error, and still a TypeError."""
    with pytest.raises(FeedTypeError, match=re.escape(fragment)) as info:
        call()
    assert isinstance(info.value, TypeError) and "\n" not in str(info.value)


def test_provider_names_resolve_in_order_of_preference():
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(None) == ["CPUExecutionProvider"]
    assert resolve_providers("cpu") == resolve_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert resolve_providers("trt, cuda", available=gpu) == gpu
    assert resolve_providers(["cudaexecutionprovider"], available=gpu) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    opts = {"device_id": 1}
    assert resolve_providers([("cuda", opts)], available=gpu) == [("CUDAExecutionProvider", opts), "CPUExecutionProvider"]


@pytest.mark.skipif(MISSING_GPU is None, reason="CUDA and TensorRT are both available: nothing to refuse")
def test_missing_provider_is_refused_in_one_line_or_falls_back_when_allowed(tmp_path):
    with pytest.raises(ProviderError) as info:
        load(tmp_path / "not-read", providers=[MISSING_GPU])  # refused before the artifact is even looked at
    message = str(info.value)
    assert "\n" not in message and "not available" in message and "onnxruntime-gpu" in message
    assert all(p in message for p in ort.get_available_providers())
    with pytest.raises(ProviderError, match="warp"):
        load(tmp_path, providers="cpu,warp")
    with pytest.warns(RuntimeWarning, match="falling back"):
        assert resolve_providers([MISSING_GPU], allow_fallback=True) == ["CPUExecutionProvider"]


@pytest.mark.slow
def test_sessions_use_the_providers_asked_for(minilm_artifact):
    assert load(minilm_artifact, providers=["cpu"]).providers == ["CPUExecutionProvider"]
    if MISSING_GPU:
        with pytest.warns(RuntimeWarning, match="falling back"):
            m = load(minilm_artifact, providers=[MISSING_GPU, "cpu"], allow_fallback=True)
        assert m.providers == ["CPUExecutionProvider"] and m.embed(["hello"]).shape == (1, 384)
    for name in ("cuda", "tensorrt"):  # where onnxruntime-gpu offers them, they are really used (unmeasured here)
        if full_name(name) in ort.get_available_providers():
            assert load(minilm_artifact, providers=[name]).providers[0] == full_name(name)


@pytest.mark.slow
def test_embed_refuses_wrong_types(minilm_artifact, dinov2_artifact):
    m, v = load(minilm_artifact), load(dinov2_artifact)
    for call, arg, fragment in [(m.embed, 123, "list of strings, got int"), (m.embed, ["a", 2], "item 1 is int"),
                                (m.embed, "text", "list of strings, got str"), (m.run, [1], "dict"),
                                (v.embed_images, np.zeros((8, 8), np.uint8), "list of PIL images"),
                                (v.embed_images, ["cat.png"], "item 0 is str"), (m.embed_images, 7, "got int")]:
        with pytest.raises(FeedTypeError, match=fragment):
            call(arg)


@pytest.mark.slow
def test_truncation_warns_once_per_model(minilm_artifact):
    long = "a sentence that goes on " * 40  # about 200 tokens; the artifact was compiled for 64
    m = load(minilm_artifact)
    with pytest.warns(TruncationWarning, match="2 of 3 texts .* compiled length of 64 tokens"):
        m.embed([long, "short", long])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.embed([long])  # already said for this model
        m.embed(["short"])
    with pytest.warns(TruncationWarning, match="1 of 1 texts"):
        load(minilm_artifact).embed([long])
