"""The pass contract: passes receive their services in a context (`run(handle, ctx)`) and import none of the stages
that provide them; `ensures` is checked after every pass; ordering rules are declared on the passes and refused in
one line; `distill` is two passes behind one name."""

from __future__ import annotations

import ast
import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from compressor.errors import CompressorError, UsageError
from compressor.passes import (Distill, DistillEncoder, DistillLM, LayerPrune, LearnedRates, SliceGPT, TokenMerge,
                               TokenPrune, WidthPrune)
from compressor.pipeline.context import PassContext
from compressor.pipeline.pass_base import CAPABILITIES, REGISTRY, Pass, PassResult, check_order, register
from compressor.pipeline.pass_manager import Pipeline
from compressor.pipeline.registry import make_pass
from compressor.program.handle import load
from compressor.targets import target_for

from .conftest import SMALL_TEXT

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("compressor.sources", "compressor.measure", "compressor.artifact", "compressor.lower",
             "compressor.program.handle")


@pytest.fixture()
def handle():
    return load("example:minilm", **SMALL_TEXT)


def _imports(path: Path) -> list[str]:
    """Every module a file imports, at any depth (function-local imports too), relative ones resolved."""
    package = "compressor." + ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            out += [base] + [f"{base}.{a.name}" for a in node.names]
    return out


def test_no_pass_imports_the_stages_that_serve_it():
    files = sorted((ROOT / "passes").rglob("*.py"))
    assert len(files) > 20
    bad = [(str(f.relative_to(ROOT)), m) for f in files for m in _imports(f)
           if any(m == x or m.startswith(x + ".") for x in FORBIDDEN)]
    assert bad == []


def test_no_pass_reads_the_modality_string():
    """Passes ask the handle's target (decoder, text, image, speech), never `adapter.modality`."""
    reads = [(str(f.relative_to(ROOT)), n.lineno) for f in sorted((ROOT / "passes").rglob("*.py"))
             for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.Attribute) and n.attr == "modality"]
    assert reads == []


def test_every_bundled_pass_takes_a_context_and_ensures_defined_capabilities():
    assert {"distill", "distill_lm", "distill_encoder"} <= set(REGISTRY)
    for name, cls in REGISTRY.items():
        assert list(__import__("inspect").signature(cls.run).parameters)[:3] == ["self", "handle", "ctx"], name
        assert cls.ensures <= set(CAPABILITIES), name


class _NoCtx(Pass):
    name = "no_ctx_test"

    def run(self, handle):  # the contract before passes received a context
        return PassResult(modified=False)


def test_a_pass_without_the_context_argument_is_refused_at_registration():
    with pytest.raises(TypeError, match=r"run must take \(self, handle, ctx\)"):
        register(_NoCtx)
    assert "no_ctx_test" not in REGISTRY


@dataclass
class _Nothing:
    pass


class _LyingPrune(Pass):
    """Claims to remove blocks and removes none."""

    name = "lying_prune_test"
    Config = _Nothing
    ensures = frozenset({"layers_pruned"})

    def run(self, handle, ctx):
        return PassResult(modified=True)


def test_an_ensures_that_does_not_hold_is_an_error_naming_pass_and_capability(handle):
    register(_LyingPrune)
    try:
        with pytest.raises(CompressorError, match="pass 'lying_prune_test' ensures 'layers_pruned'") as e:
            Pipeline([make_pass("lying_prune_test", {})]).run(handle)
        assert not isinstance(e.value, UsageError) and "\n" not in str(e.value)
    finally:
        REGISTRY.pop("lying_prune_test", None)
    assert handle.history == []  # nothing recorded for a pass that broke its contract


def test_ensures_hold_for_real_passes_including_a_schedule_that_merges_nothing(handle):
    """token_plan means a per-block schedule, which r = 0 writes too; layers_pruned and width_pruned compare with the
    model before the pass."""
    Pipeline([LayerPrune(blocks=1, metric="depth"), WidthPrune(params=0.85, importance="magnitude"),
              TokenMerge(r=0)]).run(handle)
    assert [r["name"] for r in handle.history] == ["layer_prune", "width_prune", "token_merge"]
    assert handle.plan.merges == [0] * handle.num_layers and not handle.plan.active
    assert SliceGPT(sparsity=0.0).ensured() == frozenset() and SliceGPT(sparsity=0.1).ensured() == {"sliced"}


def test_the_pipeline_hands_passes_the_context_it_is_given(handle):
    seen = []

    class Fake:
        max_builtin_images = 1

        def inputs(self, samples, length=256, seed=42, option="calibration_samples", length_option="calibration_len"):
            raise AssertionError("not drawn")

        def description(self):
            return "fake calibration"

        def paragraphs(self):
            return []

    class Reads(Pass):
        name = "reads_ctx_test"
        Config = _Nothing

        def run(self, handle, ctx):
            seen.append(ctx.calibration.description())
            return PassResult(modified=False)

    default = PassContext.for_handle(handle)
    Pipeline([Reads()]).run(handle)
    Pipeline([Reads()]).run(handle, dataclasses.replace(default, calibration=Fake()))
    assert seen == [default.calibration.description(), "fake calibration"]
    assert seen[0].startswith("Wikipedia calibration paragraphs")


@pytest.mark.parametrize("passes, first, then", [
    ([TokenMerge(r=4), LayerPrune(blocks=1)], "layer_prune", "token_merge"),
    ([TokenPrune(r=2), LearnedRates(flops=0.5)], "learned_rates", "token_prune"),
    ([SliceGPT(mode="per_layer"), WidthPrune(params=0.9)], "width_prune", "slicegpt with mode = per_layer"),
    ([SliceGPT(mode="per_layer"), LayerPrune(blocks=1)], "layer_prune", "slicegpt with mode = per_layer"),
])
def test_an_order_a_pass_refuses_is_one_line_naming_both(passes, first, then):
    with pytest.raises(UsageError, match=f"pass order: {first} must come before {then} ") as e:
        check_order(passes)
    assert "\n" not in str(e.value)


def test_orders_the_passes_accept_pass():
    for passes in ([SliceGPT(), LayerPrune(blocks=1), WidthPrune(params=0.9)],  # portable slicing: a stock model
                   [LayerPrune(blocks=1), WidthPrune(params=0.9), TokenMerge(r=4)],
                   [WidthPrune(params=0.9), LayerPrune(blocks=1), Distill()],
                   [TokenPrune(r=2), TokenMerge(r=2)], [TokenMerge(r=2), TokenPrune(r=2)],
                   [LearnedRates(flops=0.5), TokenMerge(r=2)],
                   [SliceGPT(mode="per_layer"), TokenMerge(r=4), Distill()]):
        check_order(passes)


def test_every_example_recipe_keeps_the_order_rules():
    for path in sorted((ROOT / "examples").glob("*.toml")):
        entries = tomllib.loads(path.read_text()).get("passes", [])
        check_order([make_pass(e["name"], {k: v for k, v in e.items() if k != "name"}) for e in entries])


def test_the_pipeline_refuses_a_bad_order_before_anything_runs(handle):
    with pytest.raises(UsageError, match="layer_prune must come before token_merge"):
        Pipeline([TokenMerge(r=4), LayerPrune(blocks=1)]).run(handle)
    assert handle.history == [] and not handle.plan.active


def test_distill_is_two_passes_with_their_own_options():
    lm = {f.name for f in dataclasses.fields(DistillLM.Config)}
    enc = {f.name for f in dataclasses.fields(DistillEncoder.Config)}
    union = {f.name for f in dataclasses.fields(Distill.Config)}
    assert {"seq_len", "temperature", "eval_windows"} <= lm - enc and {"samples", "eval_samples", "hidden_weight"} <= enc - lm
    assert union == lm | enc
    p = Distill(steps=3, seq_len=64, samples=8)
    as_lm, as_encoder = p.of_kind(True), p.of_kind(False)
    assert type(as_lm) is DistillLM and as_lm.config.seq_len == 64 and as_lm.config.steps == 3
    assert type(as_encoder) is DistillEncoder and as_encoder.config.samples == 8 and as_encoder.config.steps == 3
    assert p.options()["samples"] == 8 and p.name == "distill"  # the record keeps the name and every option
    assert p.calibration_need(target_for("causal_lm")) == ("steps x batch", 6)
    assert p.calibration_need(target_for("text")) == ("samples + eval_samples", 8 + 32)
    with pytest.raises(UsageError, match="distill_lm' has no option samples"):
        make_pass("distill_lm", {"samples": 8})
    with pytest.raises(UsageError, match="distill_encoder' has no option temperature"):
        make_pass("distill_encoder", {"temperature": 2.0})


def test_distill_resolves_by_the_models_kind(handle):
    assert type(Distill(samples=8).resolve(handle)) is DistillEncoder
    with pytest.raises(UsageError, match="distill option\\(s\\) seq_len apply to language models only, not this bert"):
        Distill(seq_len=64).resolve(handle)
    with pytest.raises(UsageError, match="requires \\['decoder'\\]"):
        DistillLM().check(handle)


def test_a_latency_budget_spends_the_context_clock(handle):
    """width_prune's latency budget times through `ctx.latency` and compares with `ctx.reference()`: a clock that
    charges a millisecond per million parameters stands in for onnxruntime (nothing is exported)."""
    calls = []

    class Clock:
        attempts, tolerance = 3, 0.04

        def time_handles(self, handles, repeats=10, threads=2):
            calls.append(sorted(handles))
            return {n: 1.0 + sum(p.numel() for p in h.adapter.model.parameters()) / 1e6 for n, h in handles.items()}

        def time_module_at_sizes(self, module, example, sizes, repeats=10, threads=2):
            raise AssertionError("width_prune times whole programs")

    ctx = dataclasses.replace(PassContext.for_handle(handle), latency=Clock())
    Pipeline([WidthPrune(latency=0.8, importance="magnitude")]).run(handle, ctx)
    lat = handle.history[-1]["info"]["budget"]["latency"]
    assert calls[0] == ["channels", "heads", "now"] and all(c == ["dense", "pruned"] for c in calls[1:])
    assert 1 <= len(lat["attempts"]) <= 3 and len(calls) == 1 + len(lat["attempts"])
    assert abs(lat["measured_ratio"] - 0.8) <= 0.04 * 0.8 or len(lat["attempts"]) == 3
