"""Bundled passes, one per file. Importing this package registers them by name."""

from .distill import Distill, DistillConfig
from .slicegpt import SliceGPT, SliceGPTConfig
from .token_merge import TokenMerge, TokenMergeConfig

__all__ = ["Distill", "DistillConfig", "SliceGPT", "SliceGPTConfig", "TokenMerge", "TokenMergeConfig"]
