"""The target: what differs between the kinds of model the compiler takes, owned by one object per kind.

A stage asks the target (its compile shapes, its programs, its calibration and validation data, the graphs it
exports and how they are validated, its manifest fields, its bench baselines) instead of comparing modality strings.
The family adapter (models/) says how a model of a family is built; the target says what a model of this kind is
compiled into. One instance per kind, looked up with `target_for`.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

from compressor.errors import UsageError


class Target(ABC):
    modality: ClassVar[str]  # the adapter's `modality`, and the manifest's
    kind: ClassVar[str]  # the manifest's pre-processing kind, which the runtime dispatches on
    label: ClassVar[str]  # in messages: "a text encoder"
    shapes: ClassVar[dict]  # default compile shapes; a recipe's [export] may set these keys and no other
    # what the inputs are, for the passes and sources that branch on it (never on the modality string)
    decoder: ClassVar[bool] = False  # a causal LM: dynamic lengths, a KV cache, perplexity validation
    text: ClassVar[bool] = False  # token ids of a text encoder
    image: ClassVar[bool] = False  # pixels
    speech: ClassVar[bool] = False  # mel features, several graphs
    calibrates: ClassVar[bool] = True  # its passes read calibration data
    held_out_key: ClassVar[str] = "texts"  # the recipe's [data] key naming the user's held-out validation data

    def check_shapes(self, shapes: dict) -> dict:
        """The compile shapes: the defaults, the recipe's values over them, each checked (one line, exit 2)."""
        merged = {**self.shapes, **{k: v for k, v in shapes.items() if v is not None}}
        extra = set(merged) - set(self.shapes)
        if extra:
            raise UsageError(f"export shape key(s) {sorted(extra)} do not apply to a {self.modality} model "
                             f"(use {sorted(self.shapes)})")
        if not isinstance(merged["batch"], int) or merged["batch"] < 1:
            raise UsageError(f"export batch must be a positive integer, got {merged['batch']!r}")
        return self._check_shapes(merged)

    def _check_shapes(self, merged: dict) -> dict:
        return merged

    @property
    @abstractmethod
    def Validation(self) -> type:
        """The dataclass of this kind's [validation] bars."""

    def validation_config(self, raw):
        """The typed bars from a recipe's [validation] table (and --validate overrides)."""
        from compressor.validation.bars import typed_config

        return typed_config(self.Validation, raw, self.modality)

    def program(self, handle, dense: bool = False):
        """The exportable forward; `dense=True` ignores the token plan (the baseline)."""
        from compressor.program.encoder import EncoderProgram, TokenPlan

        return EncoderProgram(handle.adapter, TokenPlan() if dense else handle.plan)

    def example_inputs(self, handle) -> tuple:
        """The probe batch as the program takes it."""
        return handle.probe_inputs

    # data: what the passes calibrate on and what validation and probes feed, drawn by compressor.sources
    calibration_description: ClassVar[str] = ""  # what calibration_inputs reads when the recipe gives no data

    def calibration_inputs(self, handle, samples: int, length: int, seed: int, option: str, length_option: str) -> tuple:
        """The inputs every calibrating pass draws (the recipe's [data] calibration or the built-in set)."""
        raise UsageError(f"{self.label} takes no calibration data (its passes calibrate on none)")

    def raw_samples(self, handle, part: str, count: int, source: str | None = None) -> list:
        """`count` raw probe or validation samples (the user's file or folder when given)."""
        raise UsageError(f"{self.label} has no raw samples")

    def preprocessor(self, handle):
        """The runtime's own pre-processing for these raw samples."""
        raise UsageError(f"{self.label} has no pre-processor for raw samples")

    def probe_feeds(self, handle, part: str = "probe", source: str | None = None) -> tuple:
        """One compiled batch as the program's input tensors."""
        from compressor.sources.inputs import encoder_feeds

        return encoder_feeds(handle, part, source)

    def check_export(self, options, shapes: dict) -> None:
        """Refuse [export] options this kind cannot take, before any work (one line, exit 2)."""
        if options.buckets:
            raise UsageError(f"[export] buckets apply to text encoders (sequence lengths); this is a {self.modality} model")

    def check_recipe(self, passes, options) -> None:
        """Refuse passes this kind cannot take, from the recipe alone (before any model loads): a pass that names
        `decoder_only` (why it needs a language model) on any other kind."""
        for p in passes:
            why = getattr(p, "decoder_only", None)
            if why and not self.decoder:
                raise UsageError(f"pass '{p.name}' applies to language models ({why}); this recipe's model is "
                                 f"{self.label}: remove the pass")

    def check_passes(self, adapter, passes) -> None:
        """Refuse passes this kind cannot carry into its artifact, before any work (default: the passes' own checks)."""

    @abstractmethod
    def write(self, handle, folder: Path, cfg, options, data: dict, recipe: dict | None, step) -> tuple[dict, dict, dict | None]:
        """Lower `handle` into `folder` (empty, temporary), validate what will ship, and return (manifest, validation
        result, bars that would pass or None); the caller hashes, publishes or refuses."""

    def __repr__(self) -> str:
        return f"<target {self.modality}>"


def check_seq_len(merged: dict) -> dict:
    """The compiled (or probe) sequence length of token inputs."""
    if not isinstance(merged["seq_len"], int) or not 8 <= merged["seq_len"] <= 512:
        raise UsageError(f"export seq_len must be an integer in 8..512, got {merged['seq_len']!r}")
    return merged


class SingleGraphTarget(Target):
    """A kind that ships one graph (model.onnx) with the family's pre-processing files: encoders, causal LMs."""

    def write(self, handle, folder: Path, cfg, options, data: dict, recipe: dict | None, step):
        from compressor.artifact.manifest import build_manifest
        from compressor.program.capture import capture, graph_stats

        step("capturing the dense baseline")
        dense = handle.baseline or graph_stats(capture(handle.program(dense=True), handle.example_inputs()))
        for name in handle.adapter.artifact_files():
            shutil.copy2(Path(handle.adapter.folder) / name, folder / name)
        stats, result, deployed = self.export(handle, folder, dense, cfg, options, data, step)
        manifest = build_manifest(handle, dense, stats, result, recipe)
        manifest["export"] = deployed
        self.finish_manifest(manifest, options)
        return manifest, result, None

    @abstractmethod
    def outputs(self, handle) -> list[dict]:
        """The manifest's `outputs`: name, shape and dtype of each output of the graph."""

    @abstractmethod
    def export(self, handle, folder: Path, dense, cfg, options, data: dict, step) -> tuple[object, dict, dict]:
        """Write model.onnx (and what ships beside it) and validate it: (graph stats, validation result, export record)."""

    def finish_manifest(self, manifest: dict, options) -> None:
        """Kind-specific manifest fields that depend on the export record (default: none)."""
