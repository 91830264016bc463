"""Passes: a typed config, what a pass requires and ensures, and a registry by name (after torch.fx passes/infra).

A pass subclasses `Pass`, sets `name`, `Config` (a dataclass), `requires`/`ensures` (capability names) and
implements `run(handle) -> PassResult`; `@register` makes it available to recipes and the CLI.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from compressor.errors import UsageError


@dataclass
class PassResult:
    modified: bool
    info: dict = field(default_factory=dict)  # what the pass decided (e.g. the schedule), stored in the manifest


class Pass:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type] = object
    requires: ClassVar[frozenset[str]] = frozenset()
    ensures: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: Any = None, **options):
        if config is not None and options:
            raise UsageError(f"pass '{self.name}': give a config object or options, not both")
        self.config = config if config is not None else parse_options(self.name, self.Config, options)

    def check(self, handle) -> None:
        """Refuse a model this pass cannot rewrite, with a one-line reason (default: the `requires` capabilities)."""
        missing = set(self.requires) - handle.capabilities
        if missing:
            raise UsageError(f"pass '{self.name}' requires {sorted(missing)}, which this {handle.adapter.family} model does not have")

    def run(self, handle) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def options(self) -> dict:
        return dataclasses.asdict(self.config)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a name to be registered")
    REGISTRY[cls.name] = cls
    return cls


def get_pass(name: str) -> type[Pass]:
    import compressor.passes  # noqa: F401  (registers the bundled passes)

    if name not in REGISTRY:
        raise UsageError(f"unknown pass '{name}' (known: {', '.join(sorted(REGISTRY))}; see 'compress passes')")
    return REGISTRY[name]


def make_pass(name: str, options: dict) -> Pass:
    return get_pass(name)(**options)


def option_table(cls: type[Pass]) -> list[tuple[str, str, str, str]]:
    """(option, type, default, help) rows for `compress passes`."""
    hints = typing.get_type_hints(cls.Config)
    rows = []
    for f in dataclasses.fields(cls.Config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((f.name, _type_name(hints[f.name]), repr(default), f.metadata.get("help", "")))
    return rows


def _type_name(tp) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def parse_options(pass_name: str, config_cls: type, options: dict) -> Any:
    """Build the typed config from recipe values or CLI strings, with one-line errors for unknown or bad options."""
    hints = typing.get_type_hints(config_cls)
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(options) - known
    if unknown:
        raise UsageError(f"pass '{pass_name}' has no option {', '.join(sorted(unknown))} (options: {', '.join(sorted(known))})")
    values = {k: _coerce(pass_name, k, v, hints[k]) for k, v in options.items()}
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as e:
        raise UsageError(f"pass '{pass_name}': {e}") from None


def _coerce(pass_name: str, key: str, value: Any, tp) -> Any:
    """Accept a value of the declared type, or a CLI string that parses to one (e.g. 'r=8', 'r=[4,4,8]')."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    candidates = [a for a in args if a is not type(None)] if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) else [tp]
    if value is None and type(None) in args:
        return None
    if isinstance(value, str):
        if str in candidates:  # a string option keeps its text ("none" is a word, not null)
            return value
        value = _parse_literal(value)
    for cand in candidates:
        ok, out = _try(value, cand)
        if ok:
            return out
    names = " or ".join(_type_name(c) for c in candidates)
    raise UsageError(f"pass '{pass_name}': option {key}={value!r} must be {names}")


def _parse_literal(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _try(value: Any, tp) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if tp is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)), float(value) if isinstance(value, (int, float)) else value
    if tp is str:
        return isinstance(value, str), value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            return False, value
        out = []
        for v in value:
            ok, c = _try(v, inner)
            if not ok:
                return False, value
            out.append(c)
        return True, out
    return False, value
