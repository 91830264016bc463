"""`compress bench --genai DIR`: an onnxruntime-genai build of the same language model as one more timed row."""

import copy
import json
from pathlib import Path

import pytest

from compressor.errors import UsageError
from compressor.measure.genai import check_build, vocab_of

from .conftest import compress
from .test_cli import assert_one_line_error, compress_in_process

# Real builds made by benchmarks/setup_genai.sh on a benchmarking machine, and a fused SmolLM2 artifact built there;
# CI machines have neither, so the tests that need them skip.
GENAI_SMOLLM2 = Path("/work/genai-builds/smollm2-int4")
FUSED_SMOLLM2 = Path(__file__).resolve().parents[1] / "out" / "smollm2-int4"

# The model section of SmolLM2-135M's genai_config.json as onnxruntime-genai's model builder writes it (INT4, CPU).
SMOLLM2_CONFIG = {
    "model": {
        "bos_token_id": 1, "context_length": 8192, "eos_token_id": [1, 2], "pad_token_id": 2, "type": "llama",
        "vocab_size": 49152,
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": "model.onnx", "head_size": 64, "hidden_size": 576,
            "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                       "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
            "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                        "present_value_names": "present.%d.value"},
            "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
        },
    },
    "search": {"do_sample": False, "max_length": 8192, "num_beams": 1, "past_present_share_buffer": True},
}


def genai_folder(root: Path, name: str, config: dict | None = SMOLLM2_CONFIG, model_file: bool = True) -> Path:
    """A genai build folder with `config` as genai_config.json (None: none) and a placeholder decoder file (the
    refusals come before any graph is opened)."""
    folder = root / name
    folder.mkdir()
    if config is not None:
        (folder / "genai_config.json").write_text(json.dumps(config))
    if model_file:
        (folder / "model.onnx").write_bytes(b"")
    return folder


def with_vocab(vocab: int) -> dict:
    config = copy.deepcopy(SMOLLM2_CONFIG)
    config["model"]["vocab_size"] = vocab
    return config


def no_head_size() -> dict:
    config = copy.deepcopy(SMOLLM2_CONFIG)
    del config["model"]["decoder"]["head_size"]
    return config


@pytest.mark.parametrize("make, fragment", [
    (lambda root: root / "missing", "does not exist"),
    (lambda root: genai_folder(root, "noconfig", config=None), "holds no genai_config.json"),
    (lambda root: genai_folder(root, "nomodel", model_file=False), "names the decoder 'model.onnx', which is not in"),
    (lambda root: genai_folder(root, "nohead", no_head_size()), "not a usable genai config (no 'head_size'"),
])
def test_the_genai_folder_is_checked_before_anything_is_read(tmp_path, capsys, make, fragment):
    folder = make(tmp_path)
    done = compress_in_process(capsys, "bench", "/no/such/artifact", "--genai", str(folder))
    assert_one_line_error(done, 2, fragment)
    assert "--genai" in done.stderr


def test_a_build_of_another_vocabulary_is_refused(tmp_path):
    folder = genai_folder(tmp_path, "other", with_vocab(50_000))
    with pytest.raises(UsageError, match="50000 vocabulary entries, the artifact's has 49152"):
        check_build(folder, 49152)
    build = check_build(genai_folder(tmp_path, "same", SMOLLM2_CONFIG), 49152)
    assert (build.num_layers, build.head_size, build.model_type, build.min_kv_slots) == (30, 64, "llama", 0)
    assert vocab_of({"preprocess": {"kind": "causal_lm"},
                     "outputs": [{"name": "logits", "shape": ["batch", "sequence", 49152]}]}) == 49152


def test_genai_is_refused_for_an_artifact_that_is_not_a_language_model(minilm_artifact, tmp_path, capsys):
    folder = genai_folder(tmp_path, "build")
    done = compress_in_process(capsys, "bench", str(minilm_artifact), "--genai", str(folder))
    assert_one_line_error(done, 2, "is a text artifact; drop --genai")


def _fused_smollm2() -> Path:
    if not (FUSED_SMOLLM2 / "manifest.json").is_file():
        pytest.skip(f"no fused SmolLM2 artifact at {FUSED_SMOLLM2} (built on the benchmarking machine only)")
    return FUSED_SMOLLM2


def test_a_build_of_another_model_is_refused_by_the_cli(tmp_path, capsys):
    artifact = _fused_smollm2()
    folder = genai_folder(tmp_path, "other", with_vocab(50_000))
    done = compress_in_process(capsys, "bench", str(artifact), "--genai", str(folder))
    assert_one_line_error(done, 2, "not the same model")


@pytest.mark.slow
def test_bench_times_the_genai_build_in_the_same_run(tmp_path):
    if not (GENAI_SMOLLM2 / "genai_config.json").is_file():
        pytest.skip(f"no onnxruntime-genai build at {GENAI_SMOLLM2} (benchmarks/setup_genai.sh makes one)")
    artifact = _fused_smollm2()
    out = tmp_path / "bench.json"
    done = compress("bench", str(artifact), "--genai", str(GENAI_SMOLLM2), "--no-baselines", "--repeats", "2",
                    "--warmup", "0", "--json", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    row = result["baselines"]["genai_int4"]
    assert row["prefill_ms"] > 0 and row["decode_ms"] > 0 and row["prefill_speedup"] > 0 and row["decode_speedup"] > 0
    assert row["build"] == str(GENAI_SMOLLM2) and row["model_type"] == "llama"
    assert result["genai"]["rows"][0] == "genai_int4"
    assert ("generator_skipped" in result["genai"]) != ("genai_int4 (genai generator)" in result["baselines"])
    assert "genai int4" in done.stdout and "speed-up vs genai int4" in done.stdout
