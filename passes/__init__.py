"""Bundled passes, one per file. Importing this package registers them by name."""

from .token_merge import TokenMerge, TokenMergeConfig

__all__ = ["TokenMerge", "TokenMergeConfig"]
