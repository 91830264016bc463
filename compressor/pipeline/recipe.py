"""Recipes (TOML): the source model, the passes with their options, export shapes, validation thresholds, data.

    [model]
    source = "example:minilm"
    [[passes]]
    name = "token_merge"
    r = 8
    [export]
    batch = 16
    seq_len = 128
    quantize = "int8-dynamic"    # deployment rewrites (optional): fuse = true, quantize, per_channel
    [validation]
    min_cosine_mean = 0.95
    [data]                        # optional: your own data
    calibration = "calib/"        # what every calibrating pass reads: a text file (lines or paragraphs) or images
    images = "held_out/"          # validation (texts = "FILE" for text models): held apart from calibration
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from compressor.errors import UsageError
from compressor.pipeline.pass_base import Pass
from compressor.pipeline.registry import make_pass
from compressor.lower.optimize import OPTIONS_KEYS, ExportOptions, export_options
from compressor.targets import Target, target_for, validation_keys

SECTIONS = {"model", "passes", "export", "validation", "data"}
EXPORT_KEYS = {"batch", "seq_len", "image_size"}
DATA_KEYS = {"texts", "images", "calibration", "calibration_sha256"}  # the hash is filled in by resolve_recipe


@dataclass
class Recipe:
    source: str
    passes: list[Pass] = field(default_factory=list)
    export: dict = field(default_factory=dict)  # compile shapes only: they go to the handle
    deploy: dict = field(default_factory=dict)  # [export] fuse / quantize / per_channel: applied to the lowered graph
    validation: dict = field(default_factory=dict)  # raw; typed by the target once the model kind is known
    data: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out: dict = {"model": {"source": self.source}}
        out["passes"] = [{"name": p.name, **{k: v for k, v in p.options().items() if v is not None}} for p in self.passes]
        out["export"] = {**self.export, **self.deploy}
        out["validation"] = dict(self.validation)
        if self.data:
            out["data"] = dict(self.data)
        return out

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())


def _table(raw: dict, key: str, allowed: set[str], where: str) -> dict:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise UsageError(f"{where}: [{key}] must be a table")
    unknown = set(value) - allowed
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {sorted(unknown)} in [{key}] (allowed: {sorted(allowed)})")
    return dict(value)


def recipe_from_dict(raw: dict, where: str = "recipe") -> Recipe:
    unknown = set(raw) - SECTIONS
    if unknown:
        raise UsageError(f"{where}: unknown section(s) {sorted(unknown)} (allowed: {sorted(SECTIONS)})")
    model = _table(raw, "model", {"source"}, where)
    if not isinstance(model.get("source"), str):
        raise UsageError(f"{where}: [model] needs source = \"PATH\" or \"example:NAME\"")
    passes = []
    entries = raw.get("passes", [])
    if not isinstance(entries, list):
        raise UsageError(f"{where}: passes must be an array of tables ([[passes]])")
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise UsageError(f"{where}: each [[passes]] entry needs name = \"PASS\"")
        options = {k: v for k, v in entry.items() if k != "name"}
        passes.append(make_pass(entry["name"], options))
    export = _table(raw, "export", EXPORT_KEYS | OPTIONS_KEYS, where)
    deploy = {k: export.pop(k) for k in OPTIONS_KEYS if k in export}
    export_options(deploy, f"{where}: [export]")  # checked now: a typo fails before any work
    validation = _table(raw, "validation", validation_keys(), where)
    data = _table(raw, "data", DATA_KEYS, where)
    return Recipe(model["source"], passes, export, deploy=deploy, validation=validation, data=data)


def load_recipe(path: str | Path) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"recipe '{path}' does not exist")
    try:
        raw = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"recipe '{path}' is not valid TOML ({e})") from None
    recipe = recipe_from_dict(raw, where=str(path))
    source = recipe.source
    if not source.startswith("example:") and not Path(source).is_absolute():
        # relative model paths are relative to the recipe file, so recipes travel with their models
        candidate = (p.parent / source)
        if candidate.exists():
            recipe.source = str(candidate)
    for key in ("calibration", "texts", "images"):  # and their data, the same way
        value = recipe.data.get(key)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute() and (p.parent / value).exists():
            recipe.data[key] = str(p.parent / value)
    return recipe


def parse_pass_spec(spec: str) -> Pass:
    """CLI form `name:key=value,key=value` (a list value may hold commas inside brackets: r=[4,4,8])."""
    name, _, rest = spec.partition(":")
    options, depth, current = {}, 0, ""
    for ch in rest + ",":
        if ch == "," and depth == 0:
            if current.strip():
                key, eq, value = current.partition("=")
                if not eq:
                    raise UsageError(f"--pass {spec}: options are key=value, got '{current}'")
                options[key.strip()] = value.strip()
            current = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        current += ch
    return make_pass(name.strip(), options)


@dataclass(frozen=True)
class ResolvedRecipe:
    """A recipe with every default filled in and checked, once, before any model loads: what `run`, `--budget` and
    the benchmarks build from. `recipe` is the same recipe with those defaults written back (the manifest records it)."""

    recipe: Recipe
    target: Target
    shapes: dict  # compile shapes
    options: ExportOptions  # [export] deployment rewrites
    validation: object  # the target's typed bars
    data: dict  # [data], calibration path absolute and hashed

    @property
    def source(self) -> str:
        return self.recipe.source

    @property
    def passes(self) -> list[Pass]:
        return self.recipe.passes

    def with_options(self, raw: dict) -> "ResolvedRecipe":
        """The same build with other deployment rewrites (the budget search's INT8 retry), checked as the recipe's."""
        from dataclasses import replace

        options = export_options(raw)
        self.target.check_export(options, self.shapes)
        self.target.check_recipe(self.passes, options)
        self.recipe.deploy = dict(raw)
        return replace(self, options=options)

    def to_dict(self) -> dict:
        return self.recipe.to_dict()

    def to_toml(self) -> str:
        return self.recipe.to_toml()


def recipe_target(recipe: Recipe) -> Target:
    """The kind of model the recipe's source is, from its config alone (no weights loaded)."""
    from compressor.models import adapter_for
    from compressor.sources.source import read_model_type, resolve_folder

    return target_for(adapter_for(read_model_type(resolve_folder(recipe.source), recipe.source)).modality)


def resolve_recipe(recipe: Recipe) -> ResolvedRecipe:
    """Fill in and check the defaults that depend on the model's kind (compile shapes, export options, validation
    bars, pass order, calibration data) from its config alone, without loading weights."""
    from compressor.pipeline.pass_base import check_order

    target = recipe_target(recipe)
    check_order(recipe.passes)
    recipe.export = target.check_shapes(recipe.export)
    options = export_options(recipe.deploy)
    target.check_export(options, recipe.export)  # before the passes run
    target.check_recipe(recipe.passes, options)
    validation = target.validation_config(recipe.validation)
    recipe.validation = asdict(validation)
    recipe.data = resolve_data(recipe.data, target, recipe.passes)
    return ResolvedRecipe(recipe, target, dict(recipe.export), options, validation, dict(recipe.data))


def resolve_data(data: dict, target: Target, passes) -> dict:
    """`[data] calibration` checked before any model loads (exists, right kind, enough for the passes, held apart
    from the validation data), its path made absolute and its content's sha256 recorded beside it: the manifest's
    recipe then says which data calibrated the artifact, and a rerun refuses data that changed."""
    from compressor.sources.data import check_calibration

    cal = check_calibration(data, target, passes)
    if cal is None:
        return data
    return {**data, "calibration": cal.path, "calibration_sha256": cal.sha256}
