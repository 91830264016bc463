"""Bundled passes, one per file. Importing this package registers them by name."""

from .distill import Distill, DistillConfig
from .layer_prune import LayerPrune, LayerPruneConfig
from .learned_rates import LearnedRates, LearnedRatesConfig
from .slicegpt import SliceGPT, SliceGPTConfig
from .token_merge import TokenMerge, TokenMergeConfig
from .token_prune import TokenPrune, TokenPruneConfig
from .width_prune import WidthPrune, WidthPruneConfig

__all__ = ["Distill", "DistillConfig", "LayerPrune", "LayerPruneConfig", "SliceGPT", "SliceGPTConfig", "TokenMerge", "TokenMergeConfig", "TokenPrune", "TokenPruneConfig",
           "WidthPrune", "WidthPruneConfig"]
