"""Lower a Whisper model (with its token plan) into a speech artifact's files: three ONNX graphs, the tokenizer, the
mel filterbank, a manifest. compressor.targets.speech validates and publishes them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from compressor.errors import UsageError
from compressor.lower.onnx import EXPORT_LOGGERS, _lower, quiet
from compressor.program.encoder import TokenPlan
from compressor.program.speech import PREFIX_TOKENS, CrossKVProgram, SpeechEncoderProgram, WhisperDecoderProgram, empty_past
from compressor.runtime.artifact import FORMAT_NAME, FORMAT_VERSION, MANIFEST, hash_folder

ENCODER_FILE, CROSS_KV_FILE, DECODER_FILE, MEL_FILE = "encoder.onnx", "cross_kv.onnx", "decoder.onnx", "mel_filters.npy"


def export_speech_graphs(adapter, plan: TokenPlan | None, folder: Path) -> int:
    """Write encoder.onnx, cross_kv.onnx and decoder.onnx into `folder`; returns the encoder's output token count."""
    c = adapter.config
    features = torch.zeros(1, c.num_mel_bins, adapter.num_frames)
    encoder = SpeechEncoderProgram(adapter, plan).eval()
    with torch.no_grad():
        hidden, sizes = encoder(features)
    n = hidden.shape[1]
    _lower(_capture(encoder, (features,)), (features,), ["input_features"], ["hidden", "frame_sizes"],
           folder / ENCODER_FILE, "ONNX lowering of the speech encoder")
    layers = c.decoder_layers
    cross_names = [f"cross.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    cross_program = CrossKVProgram(adapter).eval()
    _lower(_capture(cross_program, (hidden,)), (hidden,), ["hidden"], cross_names, folder / CROSS_KV_FILE,
           "ONNX lowering of the cross-attention keys/values")
    with torch.no_grad():
        cross = cross_program(hidden)
    past = [torch.zeros(1, t.shape[1], 3, t.shape[3]) for t in empty_past(adapter)]
    ids = torch.zeros(1, 4, dtype=torch.long)
    args = (ids, sizes, *cross, *past)
    auto = torch.export.Dim.AUTO
    dynamic = ({1: auto}, None, tuple([None] * len(cross) + [{2: auto}] * len(past)))
    past_names = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    present_names = [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    _lower(_capture(WhisperDecoderProgram(adapter).eval(), args, dynamic), args,
           ["input_ids", "frame_sizes", *cross_names, *past_names], ["logits", *present_names], folder / DECODER_FILE,
           "ONNX lowering of the speech decoder")
    return n


def _capture(program: torch.nn.Module, args, dynamic=None):
    from compressor.errors import CompressorError

    try:
        with quiet(*EXPORT_LOGGERS), torch.no_grad():
            return torch.export.export(program, tuple(args), dynamic_shapes=dynamic, strict=False)
    except Exception as e:
        raise CompressorError(f"torch.export could not capture {type(program).__name__}: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def prefix_ids(adapter) -> list[int]:
    """The decoder's forced prefix as token ids; a tokenizer without them (English-only checkpoints) is one line."""
    from transformers import WhisperTokenizerFast

    tok = WhisperTokenizerFast.from_pretrained(str(adapter.folder))
    prefix = tok.convert_tokens_to_ids(list(PREFIX_TOKENS))
    if None in prefix or tok.unk_token_id in prefix:
        raise UsageError(f"{adapter.folder}: the tokenizer lacks one of {', '.join(PREFIX_TOKENS)} "
                         "(English-only Whisper checkpoints are not supported; use a multilingual one)")
    return prefix


def speech_manifest(adapter, plan: TokenPlan, tokens_out: int, source: dict, history: list, validation: dict) -> dict:
    c = adapter.config
    prefix = prefix_ids(adapter)
    plan_counts = plan.token_counts(adapter.num_tokens({}), len(adapter.layers))
    return {
        "format": {"name": FORMAT_NAME, "version": FORMAT_VERSION},
        "source": source,
        "model": adapter.describe(),
        "model_file": ENCODER_FILE,
        "inputs": [{"name": "input_features", "shape": [1, c.num_mel_bins, adapter.num_frames], "dtype": "float32"}],
        "outputs": [{"name": "hidden", "shape": [1, tokens_out, c.d_model], "dtype": "float32"},
                    {"name": "frame_sizes", "shape": [1, tokens_out], "dtype": "float32"}],
        "preprocess": {**adapter.preprocess_config({}), "tokenizer": "tokenizer.json"},
        "speech": {
            "cross_kv_file": CROSS_KV_FILE, "decoder_file": DECODER_FILE, "mel_filters_file": MEL_FILE,
            "decoder_layers": c.decoder_layers, "heads": c.decoder_attention_heads,
            "head_dim": c.d_model // c.decoder_attention_heads, "max_target_positions": c.max_target_positions,
            "prefix_ids": prefix, "eot_id": c.eos_token_id,
            "suppress_ids": list(c.suppress_tokens or []), "begin_suppress_ids": list(c.begin_suppress_tokens or []),
        },
        "passes": history,
        "token_plan": {"merges": plan.merges or [0] * len(adapter.layers), "proportional_attention": plan.proportional_attention,
                       **plan.describe(), "token_counts": plan_counts},
        "validation": validation,
    }


def write_speech_folder(adapter, plan: TokenPlan | None, folder: Path, source: dict, history: list,
                        validation: dict | None = None) -> dict:
    """Graphs, tokenizer, filterbank and manifest (with file hashes) into an existing empty folder."""
    from transformers import WhisperFeatureExtractor

    plan = plan or TokenPlan()
    folder.mkdir(parents=True, exist_ok=True)
    n = export_speech_graphs(adapter, plan, folder)
    shutil.copy2(Path(adapter.folder) / "tokenizer.json", folder / "tokenizer.json")
    mel = WhisperFeatureExtractor.from_pretrained(str(adapter.folder)).mel_filters  # (n_fft // 2 + 1, mels)
    np.save(folder / MEL_FILE, np.asarray(mel, dtype=np.float32))
    manifest = speech_manifest(adapter, plan, n, source, history, validation or {})
    manifest["files"] = hash_folder(folder)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
