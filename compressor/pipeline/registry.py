"""Passes by name: the bundled passes register themselves on import (`@register` in pass_base), and recipes and the
CLI look them up here, so the pass contract (pass_base) never imports the passes that implement it."""

from __future__ import annotations

import compressor.passes  # noqa: F401  (registers the bundled passes)
from compressor.errors import UsageError
from compressor.pipeline.pass_base import REGISTRY, Pass


def get_pass(name: str) -> type[Pass]:
    if name not in REGISTRY:
        raise UsageError(f"unknown pass '{name}' (known: {', '.join(sorted(REGISTRY))}; see 'compress passes')")
    return REGISTRY[name]


def make_pass(name: str, options: dict) -> Pass:
    return get_pass(name)(**options)
