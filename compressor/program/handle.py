"""The model handle: the module with its family adapter, compile shapes, probe inputs, token plan and pass history."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from compressor.models import ModelAdapter

from compressor.program.encoder import TokenPlan
from compressor.sources.source import SourceInfo, load_source

@dataclass
class ModelHandle:
    adapter: ModelAdapter
    source: SourceInfo
    shapes: dict
    plan: TokenPlan = field(default_factory=TokenPlan)
    history: list[dict] = field(default_factory=list)
    probe_inputs: tuple[torch.Tensor, ...] | None = None
    baseline: object = None  # GraphStats of the model as loaded, set by the first pipeline run
    kv_policy: dict | None = None  # a language model's KV-cache policy (passes/kv_cache.py), for lowering and runtime

    @property
    def target(self):
        """What this kind of model compiles into (compressor.targets): the stages ask it, not the modality string."""
        from compressor.targets import target_for

        return target_for(self.adapter.modality)

    @property
    def capabilities(self) -> set[str]:
        ad = self.adapter
        caps = {ad.modality, ad.family, f"{ad.norm_placement}_norm"}
        caps.add("decoder" if self.target.decoder else "encoder")
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
        return self.target.program(self, dense)

    def reloaded(self) -> "ModelHandle":
        """The source model loaded again at the same shapes: the original that validation compares against."""
        return load(self.source.reload_spec, **self.shapes)

    def input_specs(self):
        return self.adapter.input_specs(self.shapes)

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        if self.probe_inputs is None:
            from compressor.sources.inputs import make_feeds

            self.probe_inputs = make_feeds(self, "probe")
        return self.target.example_inputs(self)


def load(source: str, **shapes) -> ModelHandle:
    """Load a model source (folder or example:NAME) into a handle with compile shapes (defaults per modality)."""
    adapter, info = load_source(source)
    from compressor.targets import target_for

    shapes = target_for(adapter.modality).check_shapes(shapes)
    adapter.prepare(shapes)
    return ModelHandle(adapter, info, shapes)
