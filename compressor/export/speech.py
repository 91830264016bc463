"""Compile a Whisper model (with its token plan) into a speech artifact: three ONNX graphs, the tokenizer, the mel
filterbank, a manifest; validated statistically against the dense transformers model, published atomically.

Validation transcribes synthesised speech (compressor.sources.speech) with the artifact in onnxruntime and with the
PyTorch programs (dense and compressed). Merging may flip a near-tie, so both gates are statistical: the artifact's
WER may exceed the dense WER by at most `max_wer_increase`, and its token ids must equal the compressed PyTorch
program's on at least `min_export_agreement` of the clips.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from compressor.errors import UsageError
from compressor.export.onnx import EXPORT_LOGGERS, _lower, quiet
from compressor.program.encoder import TokenPlan
from compressor.program.speech import PREFIX_TOKENS, CrossKVProgram, SpeechEncoderProgram, WhisperDecoderProgram, empty_past
from compressor.runtime.artifact import FORMAT_NAME, FORMAT_VERSION, MANIFEST, hash_folder

ENCODER_FILE, CROSS_KV_FILE, DECODER_FILE, MEL_FILE = "encoder.onnx", "cross_kv.onnx", "decoder.onnx", "mel_filters.npy"


@dataclass
class SpeechValidation:
    clips: int = 4
    max_wer_increase: float = 0.10  # absolute, compressed vs dense, on the same clips
    min_export_agreement: float = 0.5  # clips whose onnxruntime token ids equal PyTorch's (near-ties may flip)
    max_new_tokens: int = 64

    def __post_init__(self):
        if self.clips < 1 or self.max_new_tokens < 1:
            raise UsageError(f"[validation] clips and max_new_tokens must be at least 1, got {self.clips} and {self.max_new_tokens}")
        if not 0.0 <= self.min_export_agreement <= 1.0 or self.max_wer_increase < 0.0:
            raise UsageError("[validation] min_export_agreement must lie in [0, 1] and max_wer_increase be >= 0")


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


def validate_speech(compressed, adapter, plan: TokenPlan, cfg: SpeechValidation, clips) -> dict:
    """Transcribe `clips` with the artifact (onnxruntime) and with our PyTorch programs, dense and compressed.

    Export agreement: the artifact's token ids against the same compressed program in PyTorch (merging may flip a
    near-tie, so it is a rate with a floor). Quality: WER of the artifact and of the dense model against the reference
    texts, and of the artifact against the dense transcripts.
    """
    from compressor.program.speech import greedy_transcribe
    from compressor.sources.speech import word_error_rate

    refs = [text for text, _ in clips]
    onnx_ids, torch_ids, dense_ids = [], [], []
    for _, wave in clips:
        onnx_ids.append(compressed.transcribe_ids(wave, cfg.max_new_tokens))
        features = torch.from_numpy(compressed.features(wave))
        torch_ids.append(greedy_transcribe(adapter, plan, features, compressed.prefix, cfg.max_new_tokens))
        dense_ids.append(onnx_ids[-1] if not plan.active else
                         greedy_transcribe(adapter, None, features, compressed.prefix, cfg.max_new_tokens))
    decode = lambda ids: compressed.tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    dense_text, comp_text = [decode(i) for i in dense_ids], [decode(i) for i in onnx_ids]
    agreement = sum(a == b for a, b in zip(onnx_ids, torch_ids)) / len(clips)
    out = {"clips": len(clips), "wer_dense": word_error_rate(refs, dense_text), "wer_compressed": word_error_rate(refs, comp_text),
           "wer_compressed_vs_dense": word_error_rate(dense_text, comp_text),
           "identical_to_dense": sum(a == b for a, b in zip(dense_ids, onnx_ids)), "export_agreement": agreement,
           "transcripts": comp_text, "failures": []}
    if agreement < cfg.min_export_agreement:
        out["failures"].append(f"onnxruntime transcripts match PyTorch on {agreement:.0%} of clips (need {cfg.min_export_agreement:.0%})")
    if out["wer_compressed"] - out["wer_dense"] > cfg.max_wer_increase:
        out["failures"].append(f"WER rose from {out['wer_dense']:.3f} to {out['wer_compressed']:.3f} "
                               f"(allowed +{cfg.max_wer_increase:.3f})")
    out["passed"] = not out["failures"]
    out["config"] = asdict(cfg)
    return out


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


def compile_speech(adapter, plan: TokenPlan | None, output: Path, source: dict, history: list,
                   cfg: SpeechValidation | None = None, progress=None, extra: dict | None = None) -> dict:
    """Export the graphs, validate on synthesised speech against PyTorch (dense and compressed), publish only what
    passed; returns the manifest. Raises ValidationFailed (nothing published)."""
    from compressor.export.compile import publish_validated
    from compressor.runtime import load
    from compressor.sources.speech import speech_clips

    from compressor.export.publish_lock import output_lock

    cfg, plan = cfg or SpeechValidation(), plan or TokenPlan()
    step = progress or (lambda msg: None)
    output = Path(output)
    with output_lock(output):  # reentrant: run_recipe took it before the passes; creates the parent folders
        tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))
        try:
            step("exporting the encoder, cross keys/values and decoder")
            folder = tmp / "artifact"
            manifest = write_speech_folder(adapter, plan, folder, source, history)
            step(f"validating on {cfg.clips} synthesised speech clips")
            result = validate_speech(load(folder), adapter, plan, cfg, speech_clips(cfg.clips))
            manifest.update(extra or {})
            manifest["validation"] = result
            publish_validated(folder, manifest, result, output)
            return manifest
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def check_speech_passes(handle, passes) -> None:
    """A speech model takes the passes its adapter lists (the others rewrite structure the speech export does not
    carry): refuse any other in one line, before anything runs."""
    allowed = getattr(handle.adapter, "supported_passes", ())
    for p in passes:
        if p.name not in allowed:
            raise UsageError(f"pass '{p.name}' does not apply to a {handle.adapter.family} (speech) model; "
                             f"it takes {', '.join(allowed)}")


def compile_speech_handle(handle, recipe, output, *, instruments=None, progress=None) -> dict:
    """`compress run` for a speech model: the passes (token plan), then export, validation and publishing."""
    from compressor.export.compile import versions
    from compressor.export.validate import validation_config
    from compressor.pipeline.pass_manager import Pipeline
    from compressor.program.capture import capture, graph_stats

    check_speech_passes(handle, recipe.passes)  # the output folder was checked by run_recipe, before the model loaded
    prefix_ids(handle.adapter)  # an English-only checkpoint is refused now, not after the passes and three exports
    cfg = validation_config("audio", recipe.validation)
    Pipeline(recipe.passes, instruments).run(handle)
    stats = graph_stats(capture(handle.program(), handle.example_inputs()))
    manifest = compile_speech(handle.adapter, handle.plan, Path(output), handle.source.to_json(), handle.history, cfg,
                              progress, extra={"flops": {"dense": handle.baseline.flops, "compressed": stats.flops,
                                                         "ratio": handle.baseline.flops / max(stats.flops, 1),
                                                         "scope": "encoder"},
                                               "params": {"dense": handle.baseline.params, "compressed": stats.params},
                                               "recipe": recipe.to_dict(), "versions": versions()})
    return manifest
