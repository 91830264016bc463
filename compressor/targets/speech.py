"""Speech seq2seq (Whisper): three graphs (encoder, cross keys/values, decoder), the tokenizer and the mel filterbank,
validated by WER on synthesised speech against the dense model and by token agreement with the PyTorch programs."""

from __future__ import annotations

from pathlib import Path

from compressor.errors import UsageError
from compressor.targets.base import Target
from compressor.validation.speech import SpeechValidation


class SpeechTarget(Target):
    modality, kind = "audio", "speech"
    label, speech, calibrates = "a speech model", True, False
    shapes = {"batch": 1}  # one 30 s window per encoder call (speech artifacts transcribe one clip at a time)
    Validation = SpeechValidation

    def probe_feeds(self, handle, part="probe", source=None):
        """Mel features of synthesised speech, one 30 s window."""
        import torch

        from compressor.sources.speech import speech_features

        return (torch.from_numpy(speech_features(handle.adapter.folder, part, handle.shapes["batch"])),)

    def _check_shapes(self, merged: dict) -> dict:
        if merged["batch"] != 1:
            raise UsageError(f"export batch must be 1 for a speech model (one 30 s window per call), got {merged['batch']!r}")
        return merged

    def check_export(self, options, shapes: dict) -> None:
        if options.active:
            raise UsageError("[export] fuse/quantize do not apply to speech artifacts yet (they ship as lowered); remove them")
        super().check_export(options, shapes)

    def check_passes(self, adapter, passes) -> None:
        """A speech model takes the passes its adapter lists (the others rewrite structure the speech export does not
        carry); an English-only checkpoint is refused now, not after the passes and three exports."""
        from compressor.lower.speech import prefix_ids

        allowed = adapter.supported_passes
        for p in passes:
            if p.name not in allowed:
                raise UsageError(f"pass '{p.name}' does not apply to a {adapter.family} (speech) model; "
                                 f"it takes {', '.join(allowed)}")
        prefix_ids(adapter)

    def write(self, handle, folder: Path, cfg, options, data: dict, recipe: dict | None, step):
        from compressor.artifact.publish import versions
        from compressor.lower.speech import write_speech_folder
        from compressor.program.capture import capture, graph_stats
        from compressor.runtime import load
        from compressor.sources.speech import speech_clips
        from compressor.validation.speech import speech_relax, validate_speech

        stats = graph_stats(capture(handle.program(), handle.example_inputs()))
        dense = handle.baseline or graph_stats(capture(handle.program(dense=True), handle.example_inputs()))
        step("exporting the encoder, cross keys/values and decoder")
        manifest = write_speech_folder(handle.adapter, handle.plan, folder, handle.source.to_json(), handle.history)
        step(f"validating on {cfg.clips} synthesised speech clips")
        result = validate_speech(load(folder), handle.adapter, handle.plan, cfg, speech_clips(cfg.clips))
        manifest.update({"flops": {"dense": dense.flops, "compressed": stats.flops,
                                   "ratio": dense.flops / max(stats.flops, 1), "scope": "encoder"},
                         "params": {"dense": dense.params, "compressed": stats.params},
                         "recipe": recipe, "versions": versions()})
        manifest["validation"] = result
        return manifest, result, speech_relax(result)
