"""Whisper (speech): the converted checkpoint, our encoder/decoder programs against transformers, proportional
cross-attention over merged frames, the log-mel features, and the torch-free speech artifact end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from compressor.program.encoder import EncoderProgram
from compressor.program.speech import (PREFIX_TOKENS, CrossKVProgram, SpeechEncoderProgram, WhisperDecoderProgram,
                                       empty_past)
from compressor.sources.source import load_source
from compressor.sources.speech import speech_clips, word_error_rate


@pytest.fixture(scope="module")
def whisper():
    adapter, info = load_source("example:whisper-base")
    adapter.model.eval()
    return adapter, info


@pytest.fixture(scope="module")
def clips():
    return speech_clips(2, "probe")


@pytest.fixture(scope="module")
def features(whisper, clips):
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor.from_pretrained(whisper[0].folder)
    return [fe(w, sampling_rate=16000, return_tensors="pt").input_features for _, w in clips]


@pytest.fixture(scope="module")
def prefix(whisper):
    from transformers import WhisperTokenizerFast

    tok = WhisperTokenizerFast.from_pretrained(whisper[0].folder)
    return tok, tok.convert_tokens_to_ids(list(PREFIX_TOKENS))


def test_converted_checkpoint_is_whisper_base(whisper):
    adapter, info = whisper
    assert info.model_type == "whisper" and adapter.family == "whisper" and adapter.modality == "audio"
    d = adapter.describe()
    assert (d["layers"], d["decoder_layers"], d["hidden_size"], d["heads"]) == (6, 6, 512, 8)
    assert 72_000_000 < d["params"] < 74_000_000  # whisper-base: 72.6M with the tied output projection
    # the CTranslate2 writer fills the absent key bias with zeros: none survives as a parameter
    assert adapter.layers[0].k.bias is None


def test_encoder_program_equals_transformers(whisper, features):
    adapter, _ = whisper
    with torch.no_grad():
        ours = EncoderProgram(adapter).encode(features[0])
        ref = adapter.encoder(features[0]).last_hidden_state
    assert ours.hidden.shape == ref.shape == (1, 1500, 512)
    assert (ours.hidden - ref).abs().max().item() < 1e-4
    assert torch.equal(ours.size, torch.ones(1, 1500, 1))
    assert (ours.pooled - adapter.reference_forward(features[0])).abs().max().item() < 1e-5


def test_decoder_program_equals_transformers_with_kv_cache(whisper, features, prefix):
    adapter, _ = whisper
    tok, ids = prefix
    ids = torch.tensor([ids + tok.encode(" The Australian says", add_special_tokens=False)])
    with torch.no_grad():
        ref = adapter.model(input_features=features[0], decoder_input_ids=ids).logits
        hidden, sizes = SpeechEncoderProgram(adapter)(features[0])
        cross = CrossKVProgram(adapter)(hidden)
        dec = WhisperDecoderProgram(adapter)
        full, *_ = dec(ids, sizes, *cross, *empty_past(adapter))
        head, *past = dec(ids[:, :4], sizes, *cross, *empty_past(adapter))
        steps = []
        for j in range(4, ids.shape[1]):  # one token at a time through the cache
            step, *past = dec(ids[:, j:j + 1], sizes, *cross, *past)
            steps.append(step)
    assert (full - ref).abs().max().item() < 1e-3
    assert (torch.cat([head, *steps], dim=1) - ref).abs().max().item() < 1e-3


def test_proportional_cross_attention_equals_duplicated_frames(whisper, features, prefix):
    """A merged frame of size k must weigh exactly like k identical frames: the decoder over (hidden, sizes) equals
    the decoder over the frames repeated `size` times with sizes of one."""
    adapter, _ = whisper
    _, ids = prefix
    ids = torch.tensor([ids])
    with torch.no_grad():
        hidden, _ = SpeechEncoderProgram(adapter)(features[0])
        hidden = hidden[:, :40]  # any states will do; keep it small
        sizes = torch.tensor([[float(1 + i % 4) for i in range(40)]])
        repeated = hidden.repeat_interleave(sizes[0].long(), dim=1)
        dec = WhisperDecoderProgram(adapter)
        merged, *_ = dec(ids, sizes, *CrossKVProgram(adapter)(hidden), *empty_past(adapter))
        spread, *_ = dec(ids, torch.ones(1, repeated.shape[1]), *CrossKVProgram(adapter)(repeated), *empty_past(adapter))
        plain, *_ = WhisperDecoderProgram(adapter, proportional=False)(ids, sizes, *CrossKVProgram(adapter)(hidden), *empty_past(adapter))
    assert (merged - spread).abs().max().item() < 1e-3
    assert (plain - spread).abs().max().item() > 1e-2  # without log(size) the weighting is lost


def test_log_mel_matches_transformers_feature_extractor(whisper, clips, features):
    from transformers import WhisperFeatureExtractor

    from compressor.runtime.speech import log_mel

    mel = WhisperFeatureExtractor.from_pretrained(whisper[0].folder).mel_filters
    ours = log_mel(clips[0][1], np.asarray(mel, np.float32))
    assert ours.shape == (80, 3000)
    assert np.abs(ours - features[0][0].numpy()).max() < 1e-4


@pytest.mark.slow
def test_converted_weights_transcribe_real_sentences(whisper, features, clips, prefix):
    """The proof the weights were mapped right: transformers' own generate writes the sentences eSpeak spoke."""
    adapter, _ = whisper
    tok, _ = prefix
    with torch.no_grad():
        out = [adapter.model.generate(f, language="en", task="transcribe", max_new_tokens=64) for f in features]
    hyps = [tok.decode(o[0], skip_special_tokens=True) for o in out]
    assert word_error_rate([t for t, _ in clips], hyps) < 0.35, hyps  # eSpeak mangles place names; wrong weights give ~1


@pytest.fixture(scope="module")
def speech_artifact(tmp_path_factory):
    """What `compress run --model example:whisper-base --pass token_merge:r=150` builds (validation on 2 clips)."""
    from compressor.pipeline.build import run_recipe
    from compressor.pipeline.recipe import recipe_from_dict

    out = tmp_path_factory.mktemp("speech") / "whisper-tome"
    recipe = recipe_from_dict({"model": {"source": "example:whisper-base"}, "passes": [{"name": "token_merge", "r": 150}],
                               "validation": {"clips": 2, "max_wer_increase": 0.2, "max_new_tokens": 48}})
    run_recipe(recipe, out)
    return out


def test_speech_artifact_transcribes_torch_free(speech_artifact, clips):
    import json

    manifest = json.loads((speech_artifact / "manifest.json").read_text())
    v = manifest["validation"]
    assert v["passed"] and v["export_agreement"] >= 0.5 and v["wer_compressed"] <= v["wer_dense"] + 0.2
    assert manifest["outputs"][0]["shape"] == [1, 1500 - 6 * 150, 512]
    assert manifest["passes"][0]["name"] == "token_merge" and manifest["flops"]["ratio"] > 1.4
    wave = speech_artifact.parent / "clip.npy"
    np.save(wave, clips[0][1])
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "transformers", "onnx", "onnxscript", "scipy"):
            sys.modules[name] = None  # any import of these now raises ImportError
        import numpy as np
        from compressor.runtime import load, SpeechModel
        m = load({str(speech_artifact)!r})
        assert isinstance(m, SpeechModel)
        hidden, sizes = m.encode_audio(np.load({str(wave)!r}))
        assert hidden.shape == (1, 600, 512) and abs(float(sizes.sum()) - 1500) < 1e-3
        print(m.transcribe(np.load({str(wave)!r}), max_new_tokens=48))
        assert not any(k.startswith("torch") and sys.modules[k] is not None for k in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert word_error_rate([clips[0][0]], [done.stdout.strip()]) < 0.5, done.stdout  # place names come out mangled


def test_speech_runtime_refuses_bad_waveforms(speech_artifact):
    from compressor.runtime import FeedError, FeedTypeError, load

    m = load(speech_artifact)
    with pytest.raises(FeedTypeError, match="numpy waveform"):
        m.transcribe([0.0] * 16000)
    with pytest.raises(FeedError, match="mono"):
        m.transcribe(np.zeros((2, 16000), np.float32))
    with pytest.raises(FeedTypeError, match="float samples"):
        m.transcribe(np.zeros(16000, np.int16))
    with pytest.raises(FeedTypeError, match="max_new_tokens"):
        m.transcribe(np.zeros(16000, np.float32), max_new_tokens=0)


def test_models_lists_whisper_with_token_merge_only(capsys):
    from tests.test_cli import compress_in_process

    done = compress_in_process(capsys, "models", "--json")
    rows = {r["family"]: r for r in json.loads(done.stdout)}
    assert rows["whisper"]["modality"] == "audio" and rows["whisper"]["passes"] == ["token_merge"]
    assert "example:whisper-base" in rows["whisper"]["examples"]


@pytest.mark.parametrize("args, fragment", [
    (["--pass", "slicegpt:sparsity=0.2"], "does not apply to a whisper (speech) model"),
    (["--pass", "token_merge:r=150", "--seq-len", "64"], "do not apply to a audio model"),
    (["--pass", "token_merge:r=[800,0,0,0,0,0]"], "at most 750 of its 1500 may merge"),
    (["--budget", "speedup=1.5"], "--budget does not apply to speech models"),
])
def test_whisper_bad_input_is_one_line_exit_2(tmp_path, capsys, args, fragment):
    from tests.test_cli import assert_one_line_error, compress_in_process

    out = tmp_path / "out"
    done = compress_in_process(capsys, "run", "--model", "example:whisper-base", *args, "--output", str(out))
    assert_one_line_error(done, 2, fragment)
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_speech_recipe_with_deployment_rewrites_is_refused():
    """[export] fuse/quantize are not wired for the three speech graphs: refused before anything loads, not ignored."""
    from compressor.errors import UsageError
    from compressor.pipeline.recipe import recipe_from_dict, resolve_recipe

    recipe = recipe_from_dict({"model": {"source": "example:whisper-base"}, "passes": [{"name": "token_merge", "r": 150}],
                               "export": {"quantize": "int8-dynamic"}})
    with pytest.raises(UsageError, match="do not apply to speech artifacts"):
        resolve_recipe(recipe)
