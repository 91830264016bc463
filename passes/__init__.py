"""Bundled passes, one per file. Importing this package registers them by name."""

from .slicegpt import SliceGPT, SliceGPTConfig
from .token_merge import TokenMerge, TokenMergeConfig

__all__ = ["SliceGPT", "SliceGPTConfig", "TokenMerge", "TokenMergeConfig"]
