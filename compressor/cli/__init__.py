"""The `compress` command line."""

from compressor.cli.app import main

__all__ = ["main"]
