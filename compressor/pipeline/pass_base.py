"""Passes: a typed config, what a pass requires and ensures, the order it keeps, and a registry by name (after
torch.fx passes/infra).

A pass subclasses `Pass`, sets `name`, `Config` (a dataclass), `requires`/`ensures` (capability names), optionally
`runs_before`/`runs_after` (ordering rules), and implements `run(handle, ctx) -> PassResult`, where `ctx` is the
`PassContext` (compressor/pipeline/context.py: calibration data, the reference model, latency measurement,
progress); `@register` makes it available to recipes and the CLI.

- `requires` is checked before the pass runs, against `handle.capabilities` (`Pass.check`).
- `ensures` is checked after it runs (`check_ensures`, called by `Pipeline.run`): every name is a capability defined
  in `CAPABILITIES` by a predicate on the handle (some compare with the handle as it was before the pass). A pass
  whose `ensures` does not hold is a bug in the pass: CompressorError, naming the pass and the capability.
- `runs_before`/`runs_after` map another pass ("name", or "name[option=value]" for a rule that holds only for that
  setting of the other pass) to the reason; `check_order` refuses a pass list that breaks one (UsageError, one line),
  when a recipe is resolved and again when a pipeline starts.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

from compressor.errors import CompressorError, UsageError


@dataclass
class PassResult:
    modified: bool
    info: dict = field(default_factory=dict)  # what the pass decided (e.g. the schedule), stored in the manifest


class Pass:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type] = object
    requires: ClassVar[frozenset[str]] = frozenset()
    ensures: ClassVar[frozenset[str]] = frozenset()  # what the pass may establish; `ensured()` says what this one will
    runs_before: ClassVar[Mapping[str, str]] = {}  # other pass (spec) -> why this pass must come before it
    runs_after: ClassVar[Mapping[str, str]] = {}  # other pass (spec) -> why this pass must come after it

    def __init__(self, config: Any = None, **options):
        if config is not None and options:
            raise UsageError(f"pass '{self.name}': give a config object or options, not both")
        self.config = config if config is not None else parse_options(self.name, self.Config, options)

    def check(self, handle) -> None:
        """Refuse a model this pass cannot rewrite, with a one-line reason (default: the `requires` capabilities)."""
        missing = set(self.requires) - handle.capabilities
        if missing:
            raise UsageError(f"pass '{self.name}' requires {sorted(missing)}, which this {handle.adapter.family} model does not have")

    def run(self, handle, ctx) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def ensured(self) -> frozenset[str]:
        """The capabilities this instance establishes, checked after it runs (default: the class's `ensures`; a pass
        whose options decide it narrows this, e.g. slicegpt at sparsity 0 folds norms and slices nothing)."""
        return self.ensures

    def calibration_need(self, target) -> tuple[str, int] | None:
        """(option, inputs asked) when this pass reads calibration data for a model of `target`'s kind, else None:
        what a recipe's `[data] calibration` must hold, checked before the model loads."""
        return None

    def options(self) -> dict:
        return dataclasses.asdict(self.config)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a name to be registered")
    params = inspect.signature(cls.run).parameters.values()
    if len(params) < 3 and not any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params):
        raise TypeError(f"{cls.__name__}.run must take (self, handle, ctx): the pass context carries calibration data, "
                        f"the reference model, latency measurement and progress (compressor.pipeline.context)")
    unknown = set(cls.ensures) - set(CAPABILITIES)
    if unknown:
        raise TypeError(f"{cls.__name__} ensures {sorted(unknown)}, which no capability defines (define_capability)")
    for spec in (*cls.runs_before, *cls.runs_after):
        _parse_spec(spec)  # a malformed rule fails when the pass registers, not when a recipe meets it
    REGISTRY[cls.name] = cls
    return cls


# ---- ensures: capabilities as predicates on the handle ---------------------------------------------------------------

@dataclass(frozen=True)
class Capability:
    """What a capability name means, checkably: `holds(handle, before)` after the pass, where `before` is what
    `measure(handle)` returned before it ran (None when the capability needs no comparison)."""

    name: str
    meaning: str
    holds: Callable[[Any, Any], bool]
    measure: Callable[[Any], Any] | None = None


CAPABILITIES: dict[str, Capability] = {}


def define_capability(name: str, meaning: str, holds: Callable[[Any, Any], bool],
                      measure: Callable[[Any], Any] | None = None) -> Capability:
    """Define (or redefine) what `ensures = {name}` promises; a pass of your own may add its own names."""
    cap = CAPABILITIES[name] = Capability(name, meaning, holds, measure)
    return cap


def _schedule_fits(handle, _before) -> bool:
    plan, layers = handle.plan, handle.num_layers
    lists = [lst for lst in (plan.merges, plan.prunes) if lst]
    if not lists or any(len(lst) != layers or any(not isinstance(v, int) or v < 0 for v in lst) for lst in lists):
        return False
    return plan.token_counts(handle.num_tokens, layers)[-1] >= 1


def _stream_width(handle) -> int:
    """The residual stream's width as the blocks read it, summed over the attention and MLP inputs of every block."""
    return sum(l.q.in_features + sum(r.in_features for r in l.channel_readers) for l in handle.adapter.layers)


def _units(handle) -> int:
    return sum(l.heads + l.channels for l in handle.adapter.layers)


def _frozen(handle, _before) -> bool:
    model = handle.adapter.model
    return not model.training and all(not p.requires_grad and p.device.type == "cpu" for p in model.parameters())


define_capability("token_plan", "the token plan holds a per-block schedule of this model's blocks (one non-negative "
                  "count per block) that leaves tokens to the output", _schedule_fits)
define_capability("layers_pruned", "fewer blocks than before the pass", lambda h, before: h.num_layers < before,
                  lambda h: h.num_layers)
define_capability("width_pruned", "fewer attention heads and MLP channels, over all blocks, than before the pass",
                  lambda h, before: _units(h) < before, _units)
define_capability("sliced", "a narrower residual stream into the blocks than before the pass",
                  lambda h, before: _stream_width(h) < before, _stream_width)
define_capability("frozen", "every parameter frozen and on the CPU, the model in eval mode", _frozen)


def measure_ensures(p: Pass, handle) -> dict[str, Any]:
    """What the capabilities `p` will ensure compare with, measured before it runs."""
    out = {}
    for name in p.ensured():
        cap = CAPABILITIES.get(name)
        if cap is None:
            raise CompressorError(f"pass '{p.name}' ensures '{name}', which no capability defines (define_capability)")
        if cap.measure is not None:
            out[name] = cap.measure(handle)
    return out


def check_ensures(p: Pass, handle, before: dict[str, Any]) -> None:
    """After `p` ran: every capability it ensures holds, else CompressorError naming the pass and the capability."""
    for name in sorted(p.ensured()):
        cap = CAPABILITIES[name]
        if not cap.holds(handle, before.get(name)):
            raise CompressorError(f"pass '{p.name}' ensures '{name}' ({cap.meaning}), which does not hold after it ran")


# ---- ordering ----------------------------------------------------------------------------------------------------------

def _parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """"name" or "name[option=value,...]" -> (name, {option: value text})."""
    name, _, rest = spec.partition("[")
    conditions = {}
    if rest:
        if not rest.endswith("]"):
            raise TypeError(f"ordering rule {spec!r}: write name[option=value]")
        for part in rest[:-1].split(","):
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise TypeError(f"ordering rule {spec!r}: write name[option=value]")
            conditions[key.strip()] = value.strip()
    return name.strip(), conditions


def _matches(spec: str, p: Pass) -> bool:
    name, conditions = _parse_spec(spec)
    if p.name != name:
        return False
    cfg = getattr(p, "config", None)
    return all(getattr(cfg, k, object()) == _parse_literal(v) for k, v in conditions.items())


def _describe(spec: str) -> str:
    name, conditions = _parse_spec(spec)
    if not conditions:
        return name
    return f"{name} with " + " and ".join(f"{k} = {v}" for k, v in conditions.items())


def _rule(rules: Mapping[str, str], other: Pass) -> tuple[str, str] | None:
    for spec, reason in rules.items():
        if _matches(spec, other):
            return spec, reason
    return None


def check_order(passes: list[Pass]) -> None:
    """Refuse a pass list that breaks an ordering rule a pass declares (`runs_before`/`runs_after`), in one line
    naming the two passes and the rule."""
    for i, a in enumerate(passes):
        for b in passes[i + 1:]:
            # `a` comes first: wrong if b must come before a, or a must come after b
            found = _rule(type(b).runs_before, a)
            if found is not None:
                first, then = b.name, _describe(found[0])
            else:
                found = _rule(type(a).runs_after, b)
                if found is None:
                    continue
                first, then = _describe(found[0]), a.name
            raise UsageError(f"pass order: {first} must come before {then} ({found[1]}); "
                             f"this list has {a.name} first")


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
