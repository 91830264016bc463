"""Validation bars: typed [validation] tables, the bars a measured value meets, and the one line a failure ends in."""

from __future__ import annotations

import math
from dataclasses import fields

from compressor.errors import UsageError


def at_least(measured: float) -> float:
    """A lower bar the measured value meets: rounded down to 3 decimals (cosines, agreements, fractions)."""
    return math.floor(measured * 1000) / 1000


def at_most(measured: float) -> float:
    """An upper bar the measured value meets: rounded up to 3 significant digits (ratios, gaps, increases)."""
    if measured <= 0:
        return 0.0
    step = 10.0 ** (math.floor(math.log10(measured)) - 2)
    bar = float(f"{math.ceil(measured / step - 1e-9) * step:.3g}")
    return bar if bar >= measured else float(f"{bar + step:.3g}")


# What to compress less: by the passes' own option names (compress passes lists them all).
COMPRESS_LESS = "compress less (a smaller r or reduction, fewer blocks, a lower sparsity, flops or params closer to 1)"


def failure_message(result: dict, relax: dict | None = None) -> str:
    """The one line a failed validation ends in: each measured value against its bar (by key), then the two ways on:
    compress less, or relax the bar from the command line or the recipe, with bars the measured values meet."""
    relax = dict(relax or result.get("relax") or {})
    if relax:
        flags = " ".join(f"--validate {k}={v}" for k, v in relax.items())
        table = ", ".join(f"{k} = {v}" for k, v in relax.items())
        relaxed = f"relax the bar: {flags} (in a recipe: [validation] {table})"
    else:
        relaxed = "relax the bar: --validate KEY=VALUE (in a recipe: [validation] KEY = VALUE)"
    return f"validation failed, nothing published: {'; '.join(result['failures'])}; to pass, {COMPRESS_LESS} or {relaxed}"


COUNTS_MAY_BE_ZERO = {"greedy_prompts", "greedy_tokens"}  # 0: no greedy check


def typed_validation_value(key: str, value, want: type, where: str = "[validation]"):
    """A threshold as its field's type: counts are whole numbers of at least 1, bars are finite numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{where} {key} must be a number, got {value!r}")
    if want is int:
        least = 0 if key in COUNTS_MAY_BE_ZERO else 1
        if value != int(value) or value < least:
            raise UsageError(f"{where} {key} is a count: a whole number of at least {least}, got {value!r}")
        return int(value)
    return float(value)


def typed_config(cls: type, raw, modality: str):
    """A kind's bars (`cls`, a dataclass) from a recipe's raw [validation] table: unknown keys and wrong types refused
    in one line; an instance of `cls` passes through."""
    if isinstance(raw, cls):
        return raw
    raw = dict(raw or {})
    allowed = {f.name for f in fields(cls)}
    wrong = set(raw) - allowed
    if wrong:
        raise UsageError(f"[validation] key(s) {sorted(wrong)} do not apply to a {modality} model (use {sorted(allowed)})")
    return cls(**{key: typed_validation_value(key, value, type(getattr(cls, key))) for key, value in raw.items()})


def parse_validation_override(spec: str, keys: dict[str, set[type]]) -> tuple[str, int | float]:
    """`--validate KEY=VALUE`: a key of some kind's [validation] table (`keys`: key -> the types it has) and a number
    (checked against the model's kind once the model is known, as the recipe's own keys are)."""
    key, sep, text = spec.partition("=")
    key = key.strip()
    if not sep or key not in keys:
        raise UsageError(f"--validate takes KEY=VALUE with KEY a [validation] key ({', '.join(sorted(keys))}); "
                         f"got '{spec}'")
    try:
        value = int(text) if text.strip().lstrip("+-").isdigit() else float(text)
    except ValueError:
        raise UsageError(f"--validate {key} needs a number, got '{text.strip()}'") from None
    return key, typed_validation_value(key, value, int if keys[key] == {int} else float, "--validate")
