"""Bundled passes, one per file. Importing this package registers them by name."""

from .distill import Distill, DistillConfig
from .layer_prune import LayerPrune, LayerPruneConfig
from .slicegpt import SliceGPT, SliceGPTConfig
from .token_merge import TokenMerge, TokenMergeConfig
from .width_prune import WidthPrune, WidthPruneConfig

__all__ = ["Distill", "DistillConfig", "LayerPrune", "LayerPruneConfig", "SliceGPT", "SliceGPTConfig", "TokenMerge", "TokenMergeConfig",
           "WidthPrune", "WidthPruneConfig"]
