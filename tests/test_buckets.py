"""Length buckets: a text artifact ships shorter static graphs beside its compiled seq_len, and the runtime runs each
text in the shortest one that holds it (order kept, the same results as one text at a time)."""

import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from compressor.artifact.buckets import bucket_plan
from compressor.validation.encoder import cosine_rows
from compressor.program.encoder import TokenPlan
from compressor.runtime import RuntimeArtifactError, load, read_manifest
from compressor.runtime.preprocess import TextPreprocessor
from compressor.sources import data
from compressor.sources.inputs import wiki_windows

from .conftest import SMALL_TEXT, build
from .test_cli import assert_one_line_error, compress_in_process


@pytest.fixture(scope="module")
def bucketed_artifact(tmp_path_factory):
    """minilm_artifact's recipe (token_merge r=8 at 64 tokens) with a 32-token bucket."""
    return build(tmp_path_factory.mktemp("art"), "minilm-buckets", "example:minilm", [{"name": "token_merge", "r": 8}],
                 {**SMALL_TEXT, "buckets": [32]}, samples=16,
                 min_cosine_mean=0.85, min_cosine_p5=0.75)  # the bucket merges 16 of 32 (48 of 64 less the padding)


def mixed_texts():
    """Short Lee sentences (most fit 32 tokens) between Wikipedia passages that need the 64-token graph."""
    short, long = data.text_split("validation", 6), wiki_windows(3, 50)
    return [t for pair in zip(short, long + short[3:]) for t in pair]


def padded(artifact, texts):
    """The feeds at the compiled 64 tokens, as the artifact's own tokenizer makes them."""
    pre = read_manifest(artifact)["preprocess"]
    return TextPreprocessor(artifact / pre["tokenizer"], SMALL_TEXT["seq_len"], pre["pad_id"])(texts)


def test_bucket_plan_removes_only_what_the_compiled_graph_removes_beyond_padding():
    plan = TokenPlan(merges=[8, 8, 4, 2, 1, 0], prunes=[0, 6, 0, 0, 0, 0])  # 29 tokens removed from 64
    small = bucket_plan(plan, seq_len=64, bucket=48, layers=6, protected=2)  # 16 padding tokens go first
    assert small.prunes == [0, 6, 0, 0, 0, 0] and small.merges == [0, 0, 4, 2, 1, 0]  # 29 - 16 = 13 real tokens
    assert bucket_plan(plan, 64, 32, 6, 2).merges == [] and bucket_plan(plan, 64, 32, 6, 2).prunes == []  # all padding
    capped = bucket_plan(TokenPlan(merges=[40] * 6), seq_len=128, bucket=16, layers=6, protected=2)
    assert capped.merges == [0, 0, 7, 3, 2, 1]  # padding (112) goes by layer 3; then at most (16 - 2) // 2, ...


@pytest.mark.slow
def test_manifest_lists_and_hashes_every_graph(bucketed_artifact, tmp_path):
    m = read_manifest(bucketed_artifact)
    graphs = m["export"]["buckets"]
    assert [(g["seq_len"], g["model_file"]) for g in graphs] == [(32, "model.s32.onnx"), (64, "model.onnx")]
    assert {"model.onnx", "model.s32.onnx"} <= set(m["files"])
    small = graphs[0]
    # r=8 at 64 tokens removes 8, 16, ..., 48 by layer; for a 32-token text the first 32 of those are padding
    assert small["token_plan"]["merges"] == [0, 0, 0, 0, 8, 8]
    assert small["inputs"][0]["shape"] == [SMALL_TEXT["batch"], 32]
    assert small["validation"]["passed"] and small["validation"]["real_tokens_per_sample"] == 32
    assert m["validation"]["passed"] and m["validation"]["buckets"][0]["seq_len"] == 32
    copy = tmp_path / "copy"
    shutil.copytree(bucketed_artifact, copy)
    data = (copy / "model.s32.onnx").read_bytes()
    (copy / "model.s32.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeArtifactError, match="model.s32.onnx"):
        load(copy)


@pytest.mark.slow
def test_embed_routes_each_text_to_its_bucket_in_order(bucketed_artifact):
    model = load(bucketed_artifact)
    texts = mixed_texts()
    together = model.embed(texts)
    alone = np.concatenate([model.embed([t]) for t in texts])
    assert together.shape == (len(texts), 384)
    assert np.allclose(together, alone, atol=1e-5)  # order kept, filler rows dropped
    feeds = padded(bucketed_artifact, texts)
    lengths = feeds["attention_mask"].sum(1)
    assert (lengths <= 32).sum() >= 3 and (lengths > 32).sum() >= 3
    # texts over 32 tokens ran the 64-token graph, the others the 32-token one (which merges their real tokens)
    main = model._run_padded(feeds)
    assert np.allclose(together[lengths > 32], main[lengths > 32], atol=1e-5)
    assert not np.allclose(together[lengths <= 32], main[lengths <= 32], atol=1e-3)


@pytest.mark.slow
def test_short_texts_stay_close_to_the_unbucketed_artifact(bucketed_artifact, minilm_artifact):
    texts = data.text_split("validation", 32)
    bucketed, plain = load(bucketed_artifact), load(minilm_artifact)
    fits = padded(bucketed_artifact, texts)["attention_mask"].sum(1) <= 32
    ours, theirs = bucketed.embed(texts), plain.embed(texts)
    cos = cosine_rows(ours, theirs)[fits]
    assert len(cos) >= 16
    # both graphs take the padding first, so a short text loses about as many real tokens in either
    print("bucketed vs unbucketed on short texts: cosine mean", cos.mean(), "p5", np.percentile(cos, 5))
    assert cos.mean() > 0.9 and np.percentile(cos, 5) > 0.8, (cos.mean(), np.percentile(cos, 5))
    assert cosine_rows(ours, np.roll(theirs, 1, axis=0))[fits].mean() < 0.6  # each row is its own text's


@pytest.mark.slow
def test_bucketed_runtime_works_with_torch_unimportable(bucketed_artifact):
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "transformers", "onnx", "onnxscript"):
            sys.modules[name] = None  # any import of these now raises ImportError
        import numpy as np
        from compressor.runtime import load
        m = load({str(bucketed_artifact)!r})
        texts = ["hello world", {" ".join(["word"] * 50)!r}, "three", "four", "and a fifth one"]
        e = m.embed(texts)
        assert e.shape == (5, 384) and np.isfinite(e).all()
        assert np.allclose(e[1], m.embed([texts[1]])[0], atol=1e-5)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.mark.parametrize("source, buckets, fragment", [
    ("example:minilm", '"32"', "must be a list of sequence lengths"),
    ("example:minilm", "[32, true]", "must be a list of sequence lengths"),
    ("example:minilm", "[4, 32]", "at least 8 tokens, got 4"),
    ("example:minilm", "[32, 16, 32]", "lists 32 more than once"),
    ("example:minilm", "[32, 64]", "shorter than seq_len = 64"),
    ("example:dinov2-small", "[32]", "apply to text encoders"),
])
def test_bad_buckets_are_one_line_and_write_nothing(tmp_path, capsys, source, buckets, fragment):
    shape = "seq_len = 64" if "minilm" in source else "image_size = [112, 112]"
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[model]\nsource = "{source}"\n[export]\nbatch = 4\n{shape}\nbuckets = {buckets}\n')
    out = tmp_path / "out"
    done = compress_in_process(capsys, "run", str(recipe), "--output", str(out))
    assert_one_line_error(done, 2, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.toml"]
