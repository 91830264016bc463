"""The model handle: the module with its family adapter, compile shapes, probe inputs, token plan and pass history."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from compressor.models import ModelAdapter

from compressor.errors import UsageError
from compressor.program.encoder import EncoderProgram, TokenPlan
from compressor.sources.source import SourceInfo, load_source

DEFAULT_SHAPES = {
    "text": {"batch": 16, "seq_len": 128},
    "image": {"batch": 8, "image_size": [224, 224]},
    "causal_lm": {"batch": 1, "seq_len": 128},  # the probe/capture shape; LM graphs keep batch and lengths dynamic
    "audio": {"batch": 1},  # one 30 s window per encoder call (speech artifacts transcribe one clip at a time)
}


@dataclass
class ModelHandle:
    adapter: ModelAdapter
    source: SourceInfo
    shapes: dict
    plan: TokenPlan = field(default_factory=TokenPlan)
    history: list[dict] = field(default_factory=list)
    probe_inputs: tuple[torch.Tensor, ...] | None = None
    baseline: object = None  # GraphStats of the model as loaded, set by the first pipeline run

    @property
    def capabilities(self) -> set[str]:
        ad = self.adapter
        caps = {ad.modality, ad.family, f"{ad.norm_placement}_norm"}
        caps.add("decoder" if ad.modality == "causal_lm" else "encoder")
        if self.plan.active:
            caps.add("token_plan")
        return caps

    @property
    def num_tokens(self) -> int:
        return self.adapter.num_tokens(self.shapes)

    @property
    def num_layers(self) -> int:
        return len(self.adapter.layers)

    def program(self, dense: bool = False) -> torch.nn.Module:
        """The exportable forward; `dense=True` ignores the token plan (the baseline)."""
        if self.adapter.modality == "causal_lm":
            from compressor.program.decoder import DecoderProgram

            return DecoderProgram(self.adapter)
        return EncoderProgram(self.adapter, TokenPlan() if dense else self.plan)

    def input_specs(self):
        return self.adapter.input_specs(self.shapes)

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        if self.probe_inputs is None:
            from compressor.sources.inputs import make_feeds

            self.probe_inputs = make_feeds(self, "probe")
        if self.adapter.modality == "causal_lm":  # the dummy past follows the blocks' current key/value heads
            from compressor.program.decoder import prefill_inputs

            return prefill_inputs(self.adapter, self.probe_inputs[0])
        return self.probe_inputs


def check_shapes(modality: str, shapes: dict) -> dict:
    merged = {**DEFAULT_SHAPES[modality], **{k: v for k, v in shapes.items() if v is not None}}
    allowed = set(DEFAULT_SHAPES[modality])
    extra = set(merged) - allowed
    if extra:
        raise UsageError(f"export shape key(s) {sorted(extra)} do not apply to a {modality} model (use {sorted(allowed)})")
    if not isinstance(merged["batch"], int) or merged["batch"] < 1:
        raise UsageError(f"export batch must be a positive integer, got {merged['batch']!r}")
    if modality == "audio" and merged["batch"] != 1:
        raise UsageError(f"export batch must be 1 for a speech model (one 30 s window per call), got {merged['batch']!r}")
    if modality in ("text", "causal_lm") and (not isinstance(merged["seq_len"], int) or not 8 <= merged["seq_len"] <= 512):
        raise UsageError(f"export seq_len must be an integer in 8..512, got {merged['seq_len']!r}")
    if modality == "image":
        size = merged["image_size"]
        if isinstance(size, int):
            size = [size, size]
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and s >= 14 for s in size)):
            raise UsageError(f"export image_size must be [height, width] (or one int), got {merged['image_size']!r}")
        merged["image_size"] = size
    return merged


def load(source: str, **shapes) -> ModelHandle:
    """Load a model source (folder or example:NAME) into a handle with compile shapes (defaults per modality)."""
    adapter, info = load_source(source)
    shapes = check_shapes(adapter.modality, shapes)
    adapter.prepare(shapes)
    return ModelHandle(adapter, info, shapes)
