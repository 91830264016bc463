"""Encoders: one static-shape graph that maps a batch of inputs to one embedding per sample, validated by cosine
similarity to the original PyTorch model on held-out inputs."""

from __future__ import annotations

from pathlib import Path

from compressor.errors import UsageError
from compressor.targets.base import SingleGraphTarget, check_seq_len
from compressor.validation.encoder import ValidationConfig


class EncoderTarget(SingleGraphTarget):
    Validation = ValidationConfig

    def export(self, handle, folder: Path, dense, cfg, options, data: dict, step):
        from compressor.artifact.compile import write_transformers_folder
        from compressor.lower.onnx import MODEL_FILE, export_onnx
        from compressor.lower.optimize import deploy_graph, lowered_path
        from compressor.runtime.model import make_session
        from compressor.validation.encoder import validate

        step("capturing and lowering to ONNX")
        stats = export_onnx(handle, folder)
        if stats.params != dense.params and handle.adapter.transformers_loadable:  # structure changed, reloadably
            write_transformers_folder(handle, folder, step)
        deployed, lowered = deploy_graph(folder / MODEL_FILE, options, handle.adapter, step)
        step("validating on held-out inputs")
        source = data.get(self.held_out_key)
        original = handle.reloaded()
        result = validate(handle, make_session(folder / MODEL_FILE), cfg, source, original.program(dense=True),
                          make_session(lowered) if lowered else None)
        lowered_path(folder / MODEL_FILE).unlink(missing_ok=True)
        if options.buckets:
            from compressor.artifact.buckets import compile_buckets

            deployed["buckets"] = compile_buckets(handle, original, folder, options, cfg, source, result, step)
        return stats, result, deployed

    def outputs(self, handle) -> list[dict]:
        from compressor.lower.onnx import OUTPUT_NAME

        width = handle.adapter.output_size  # e.g. CLIP's projection
        return [{"name": OUTPUT_NAME, "shape": [handle.shapes["batch"], width], "dtype": "float32"}]


class TextEncoderTarget(EncoderTarget):
    modality = kind = "text"
    label, text, held_out_key = "a text encoder", True, "texts"
    shapes = {"batch": 16, "seq_len": 128}
    calibration_description = "Wikipedia calibration paragraphs (gensim test data, first 80% of the articles)"

    def calibration_inputs(self, handle, samples, length, seed, option, length_option):
        from compressor.sources.inputs import as_inputs, text_calibration

        return as_inputs(handle, text_calibration(handle, samples, seed, option))

    def raw_samples(self, handle, part, count, source=None):
        from compressor.sources.inputs import text_samples

        return text_samples(handle, part, count, source)

    def preprocessor(self, handle):
        from compressor.sources.inputs import text_preprocessor

        return text_preprocessor(handle)

    def _check_shapes(self, merged: dict) -> dict:
        return check_seq_len(merged)

    def check_export(self, options, shapes: dict) -> None:
        """Buckets are shorter text graphs: each shorter than the compiled seq_len (which is always the last)."""
        too_long = [b for b in options.buckets or [] if b >= shapes["seq_len"]]
        if too_long:
            raise UsageError(f"[export] buckets must be shorter than seq_len = {shapes['seq_len']} (it is always the "
                             f"last bucket), got {too_long[0]}")


class ImageEncoderTarget(EncoderTarget):
    modality = kind = "image"
    label, image, held_out_key = "an image encoder", True, "images"
    shapes = {"batch": 8, "image_size": [224, 224]}

    @property
    def calibration_description(self) -> str:
        from compressor.sources.photos import CALIBRATION_DESCRIPTION

        return CALIBRATION_DESCRIPTION

    def calibration_inputs(self, handle, samples, length, seed, option, length_option):
        from compressor.sources.inputs import as_inputs, image_calibration

        return as_inputs(handle, image_calibration(handle, samples, seed, option))

    def raw_samples(self, handle, part, count, source=None):
        from compressor.sources.inputs import image_samples

        return image_samples(handle, part, count, source)

    def preprocessor(self, handle):
        from compressor.sources.inputs import image_preprocessor

        return image_preprocessor(handle)

    def _check_shapes(self, merged: dict) -> dict:
        size = merged["image_size"]
        if isinstance(size, int):
            size = [size, size]
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and s >= 14 for s in size)):
            raise UsageError(f"export image_size must be [height, width] (or one int), got {merged['image_size']!r}")
        merged["image_size"] = size
        return merged
