"""Schedules of the token_merge pass, the pass manager's records, and a user-written pass."""

from dataclasses import dataclass

import pytest

from compressor import Pass, PassResult, Pipeline, register
from compressor.program.capture import capture, graph_stats
from compressor.errors import UsageError
from compressor.program.handle import load
from compressor.pipeline.pass_base import REGISTRY, option_table
from compressor.pipeline.registry import get_pass
from compressor.passes import TokenMerge
from compressor.pipeline.recipe import parse_pass_spec

from .conftest import SMALL_TEXT


@pytest.fixture()
def handle():
    return load("example:minilm", **SMALL_TEXT)


def test_constant_schedule_is_capped(handle):
    Pipeline([TokenMerge(r=20)]).run(handle)
    # 64 tokens, 2 protected: 20, 20, then caps bind: (24-2)//2=11, (13-2)//2=5, 3, 1
    assert handle.plan.merges == [20, 20, 11, 5, 3, 1]
    assert handle.plan.token_counts(64, 6) == [64, 44, 24, 13, 8, 5, 4]


def test_history_records_effect(handle):
    Pipeline([TokenMerge(r=4)]).run(handle)
    (record,) = handle.history
    assert record["name"] == "token_merge" and record["options"]["r"] == 4
    assert record["flops_after"] < record["flops_before"]
    assert record["params_after"] == record["params_before"]
    assert record["seconds"] >= 0 and record["probe"]["cosine_to_previous_mean"] > 0.9
    assert record["info"]["schedule"] == [4] * 6


def test_reduction_target_is_met_on_the_graph(handle):
    dense = graph_stats(capture(handle.program(dense=True), handle.example_inputs())).flops
    Pipeline([TokenMerge(reduction=0.3)]).run(handle)
    ours = graph_stats(capture(handle.program(), handle.example_inputs())).flops
    assert 1 - ours / dense >= 0.3
    smaller = [max(0, r - 1) for r in handle.plan.merges]
    assert smaller != handle.plan.merges


@pytest.mark.parametrize("options, message", [
    ({"r": [4, 4]}, "one value per layer"),
    ({"r": [40, 0, 0, 0, 0, 0]}, "at most 31"),
    ({"reduction": 0.99}, "out of reach"),
])
def test_impossible_schedules_are_usage_errors(handle, options, message):
    with pytest.raises(UsageError, match=message):
        Pipeline([TokenMerge(**options)]).run(handle)


@pytest.mark.parametrize("options, message", [
    ({"r": 2, "reduction": 0.4}, "either r or reduction"),
    ({"r": -1}, "non-negative"),
    ({"reduction": 1.5}, "between 0 and 1"),
    ({"speed": 3}, "no option speed"),
    ({"r": "many"}, "must be int"),
])
def test_bad_options_are_usage_errors(options, message):
    with pytest.raises(UsageError, match=message):
        TokenMerge(**options)


def test_cli_pass_spec_parses_types():
    p = parse_pass_spec("token_merge:r=[4,4,8,8,8,8],proportional_attention=false")
    assert p.config.r == [4, 4, 8, 8, 8, 8] and p.config.proportional_attention is False
    with pytest.raises(UsageError, match="unknown pass"):
        parse_pass_spec("tome:r=8")


def test_passes_are_listed_with_options():
    rows = {row[0]: row for row in option_table(get_pass("token_merge"))}
    assert set(rows) == {"r", "reduction", "decay", "proportional_attention", "method"}


@dataclass
class LateMergeConfig:
    r: int = 8
    layers: int = 2


class LateMerge(Pass):
    """A user pass in a few lines: merge only in the last layers."""

    name = "late_merge_test"
    Config = LateMergeConfig
    requires = frozenset({"encoder"})

    def run(self, handle, ctx):
        n = handle.num_layers
        handle.plan.merges = [0] * (n - self.config.layers) + [self.config.r] * self.config.layers
        return PassResult(modified=True, info={"schedule": handle.plan.merges})


def test_user_pass_registers_and_runs(handle):
    register(LateMerge)
    try:
        p = parse_pass_spec("late_merge_test:r=6")
        Pipeline([p]).run(handle)
        assert handle.plan.merges == [0, 0, 0, 0, 6, 6]
        assert handle.history[0]["flops_after"] < handle.history[0]["flops_before"]
    finally:
        REGISTRY.pop("late_merge_test", None)
