"""`--budget`: the compiler picks passes to meet a stated FLOPs or parameter budget, or refuses in one line."""

from __future__ import annotations

import json

import pytest

from compressor.errors import UsageError
from compressor.pipeline.budget import parse_budget, run_budget
from compressor.pipeline.recipe import recipe_from_dict


def minilm_recipe(**extra):
    return recipe_from_dict({"model": {"source": "example:minilm"}, "export": {"batch": 4, "seq_len": 64},
                             # merging and pruning on texts that fill 64 tokens: the budget is under test, not the bar
                             "validation": {"samples": 16, "min_cosine_mean": 0.8, "min_cosine_p5": 0.5}, **extra})


@pytest.mark.parametrize("spec, message", [
    ("params=1.5", "strictly between 0 and 1"),
    ("flops=0", "strictly between 0 and 1"),
    ("speedup=0.9", "no speed-up"),
    ("latency_ms=-3", "positive"),
    ("gflops=2", "KEY one of"),
    ("speedup=fast", "needs a number"),
    ("speedup=2,against=dynamic", "against=static|fused|fused_int8"),
    ("flops=0.5,against=fused", "applies to speedup budgets"),
])
def test_bad_budgets_are_refused_in_one_line(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_budget(spec)


def test_budget_and_explicit_passes_are_refused(tmp_path):
    recipe = minilm_recipe(passes=[{"name": "token_merge", "r": 4}])
    with pytest.raises(UsageError, match="not both"):
        run_budget(recipe, parse_budget("flops=0.5"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("spec, driver", [("flops=0.6", "token_merge"), ("params=0.85", "width_prune")])
def test_budget_is_met_and_recorded(spec, driver, tmp_path):
    budget = parse_budget(spec)
    manifest = run_budget(minilm_recipe(), budget, tmp_path / "out")
    assert driver in [p["name"] for p in manifest["passes"]]
    recorded = json.loads((tmp_path / "out" / "manifest.json").read_text())["budget"]
    assert recorded["requested"][budget.key] == budget.value
    assert recorded["within_tolerance"]
    assert recorded["measured"][budget.key] <= budget.value * (1 + budget.tolerance)  # a ceiling
    assert recorded["measured"][budget.key] >= budget.value - 0.1  # and not far below it
    # the artifact is published and nothing of the search is left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_budget_command_refuses_in_one_line(tmp_path, capsys):
    from compressor.cli import main

    assert main(["run", "--model", "example:minilm", "--budget", "params=1.2", "--output", str(tmp_path / "o")]) == 2
    assert main(["run", "--model", "example:minilm", "--budget", "flops=0.5", "--pass", "token_merge:r=4",
                 "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    assert not (tmp_path / "o").exists()


def test_speed_search_interpolates_between_attempts_that_bracket_the_target():
    from compressor.pipeline.budget import next_keep

    # one attempt too slow: remove FLOPs in proportion to the speed-up still missing
    assert next_keep([(0.67, 1.32)], 1.5) < 0.67
    # one too slow, one too fast: the next lies between them, nearer the one whose speed-up is nearer the target
    k = next_keep([(0.67, 1.32), (0.59, 1.69)], 1.5)
    assert 0.59 < k < 0.67 and abs(k - 0.631) < 0.005


def test_speedup_is_measured_against_the_named_dense_deployment(minilm_artifact):
    """`against=fused`: the artifact is timed against the dense model exported as optimum does and fused by
    onnxruntime, on passages that fill the compiled length; the budget records what it was measured against."""
    from compressor.pipeline.budget import measure_speed

    assert parse_budget("speedup=1.5,against=fused").to_json() == {"speedup": 1.5, "tolerance": 0.05, "against": "fused"}
    got = measure_speed(minilm_artifact, "fused")
    assert got["against"] == "fused" and "Wikipedia passages" in got["distribution"]
    assert got["speedup"] == pytest.approx(got["dense_ms"] / got["compressed_ms"]) and got["speedup"] > 0
