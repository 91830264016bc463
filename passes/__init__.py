"""Bundled passes, one per file (or package). Importing this package registers them by name."""

from .distill import Distill, DistillConfig, DistillEncoder, DistillLM, EncoderDistillConfig, LMDistillConfig
from .kv_cache import KVCache, KVCacheConfig
from .layer_prune import LayerPrune, LayerPruneConfig
from .learned_rates import LearnedRates, LearnedRatesConfig
from .slicegpt import SliceGPT, SliceGPTConfig
from .token_merge import TokenMerge, TokenMergeConfig
from .token_prune import TokenPrune, TokenPruneConfig
from .width_prune import WidthPrune, WidthPruneConfig

__all__ = ["Distill", "DistillConfig", "DistillEncoder", "DistillLM", "EncoderDistillConfig", "LMDistillConfig",
           "KVCache", "KVCacheConfig", "LayerPrune", "LayerPruneConfig", "LearnedRates", "LearnedRatesConfig", "SliceGPT", "SliceGPTConfig",
           "TokenMerge", "TokenMergeConfig", "TokenPrune", "TokenPruneConfig", "WidthPrune", "WidthPruneConfig"]
