"""learned_rates (DiffRate): the search forward computes what the static program computes, the budget pulls the
rates, the pass meets its FLOPs target with a schedule the program compiles, and bad options are one-line errors."""

from __future__ import annotations

import pytest
import torch

from compressor import Pipeline
from compressor.errors import UsageError
from compressor.passes import LearnedRates
from compressor.program.token_cost import TokenFlops
from compressor.passes.learned_rates.rates import KeptCounts
from compressor.passes.learned_rates.search import search_forward
from compressor.program.encoder import TokenPlan
from compressor.program.handle import load
from compressor.sources.inputs import make_feeds

from .conftest import SMALL_IMAGE, SMALL_TEXT, build, compress

QUICK = {"steps": 2, "batch": 4, "calibration_samples": 8, "exchanges": 6}


@pytest.fixture(scope="module")
def minilm():
    return load("example:minilm", **SMALL_TEXT)


@pytest.fixture(scope="module")
def dinov2():
    return load("example:dinov2-small", **SMALL_IMAGE)


def fresh(handle):
    handle.plan, handle.history = TokenPlan(), []
    return handle


def rates_for(layers: int, tokens: int, kept: list[int]) -> KeptCounts:
    rates = KeptCounts(layers, tokens, 3, 1)
    with torch.no_grad():  # all mass on one candidate per layer: the hard counts are exactly `kept`
        rates.logits.fill_(-50.0)
        for i, k in enumerate(kept):
            rates.logits[i, tokens - k] = 50.0
    return rates


@pytest.mark.parametrize("model, prune_kept, merge_kept", [
    ("dinov2", [65, 57, 57, 50, 50, 44, 44, 40, 40, 36, 36, 30], [60, 57, 52, 50, 47, 44, 42, 40, 38, 36, 33, 30]),
    ("minilm", None, [56, 50, 44, 40, 36, 30]),
])
def test_search_forward_is_the_compiled_program(request, model, prune_kept, merge_kept):
    """With the rates' hard counts, the masked search forward (every token kept, dropped ones masked) gives the pooled
    output of the static program compiled with that schedule: what the search optimises is what ships."""
    handle = fresh(request.getfixturevalue(model))
    ad, n, layers = handle.adapter, handle.num_tokens, handle.num_layers
    inputs = make_feeds(handle, "validation")
    prune = rates_for(layers, n, prune_kept) if prune_kept else None
    merge = rates_for(layers, n, merge_kept)
    with torch.no_grad():
        pooled, stream, sched = search_forward(ad, inputs, prune, merge, proportional=True)
    assert any(sched.merges) and (prune is None or any(sched.prunes))
    handle.plan = TokenPlan(merges=sched.merges, prunes=sched.prunes if prune else [], proportional_attention=True)
    with torch.no_grad():
        compiled = handle.program()(*inputs)
        dense = handle.program(dense=True)(*inputs)
    cos = torch.nn.functional.cosine_similarity(pooled.double(), compiled.double(), dim=-1)
    assert cos.min() > 0.999, cos
    assert stream.alive == handle.plan.token_counts(n, layers)[-1]
    # and the schedule is a real reduction: the output moved away from the dense one
    assert torch.nn.functional.cosine_similarity(compiled, dense, dim=-1).mean() < 0.9995


def test_budget_penalty_pulls_the_rates(minilm):
    """From no reduction, the FLOPs penalty alone moves the expected cost towards a lower target, step by step."""
    handle = fresh(minilm)
    ad, n, layers = handle.adapter, handle.num_tokens, handle.num_layers
    merge = KeptCounts(layers, n, 4, 4)
    merge.start_at([n] * layers)
    cost = TokenFlops.of(handle)
    opt = torch.optim.Adam([merge.logits], lr=0.5)
    inputs = make_feeds(handle, "probe")
    seen = []
    for _ in range(4):
        _, _, sched = search_forward(ad, inputs, None, merge, proportional=False)
        fraction = cost.fraction(sched.counts)
        seen.append(fraction.item())
        opt.zero_grad()
        (5.0 * (fraction - 0.4) ** 2).backward()
        assert merge.logits.grad.abs().sum() > 0
        opt.step()
    assert seen[-1] < seen[0] - 0.05, seen


def test_pass_meets_budget_and_lower_budget_keeps_fewer_tokens(minilm):
    got = {}
    for target in (0.7, 0.5):
        handle = fresh(minilm)
        Pipeline([LearnedRates(flops=target, **QUICK)]).run(handle)
        rec = handle.history[-1]
        measured = rec["flops_after"] / rec["flops_before"]
        assert target - 0.05 < measured <= target + 0.01, (target, measured)
        info = rec["info"]
        assert info["merges"] == handle.plan.merges and info["prunes"] == [] and len(info["merges"]) == handle.num_layers
        assert abs(info["flops_fraction"] - measured) < 0.01  # the analytic cost model agrees with the captured graph
        counts = handle.plan.token_counts(handle.num_tokens, handle.num_layers)
        assert all(a >= b for a, b in zip(counts, counts[1:]))
        got[target] = counts[-1]
        with torch.no_grad():
            out = handle.program()(*make_feeds(handle, "validation"))
        assert torch.isfinite(out).all() and rec["probe"]["cosine_to_previous_mean"] > 0.5
    assert got[0.5] < got[0.7]


def test_exchanges_trade_tokens_at_the_budget_and_the_choice_is_the_best_on_held_out_inputs(dinov2):
    """The measured exchanges keep every schedule they try valid for the static program and within the budget, never
    end worse than they started on their own inputs, and the pass keeps whichever of start, learned and exchanged
    scores best on the calibration inputs held out of both."""
    from compressor.passes.learned_rates.exchange import TokenSchedule, exchange, trades, valid

    handle = fresh(dinov2)
    n, layers, protected = handle.num_tokens, handle.num_layers, handle.adapter.protected_per_sample
    cost = TokenFlops.of(handle)
    start = TokenSchedule((0,) * layers, (3,) * (layers - 2) + (0, 0))
    target = float(cost.fraction(hard_counts_of(start, n)))
    seen = []

    def score(s):  # a made-up loss that wants the reduction late: exchanges must move tokens towards the end
        assert valid(s, n, protected) and float(cost.fraction(hard_counts_of(s, n))) <= target + 1e-9
        seen.append(s)
        return sum((i + 1) * (p + r) for i, (p, r) in enumerate(zip(s.prunes, s.merges))) * -1.0

    best, kept = exchange(start, score(start), "start", score, cost, target, n, protected, learn_prune=True,
                          learn_merge=True, step=4, granularity=1, budget=40)
    assert len(seen) <= 41 and kept[0]["trade"] == "start" and len(kept) > 1
    assert kept[-1]["loss"] < kept[0]["loss"] and score(best) == kept[-1]["loss"]
    assert sum(best.merges[layers // 2:]) + sum(best.prunes[layers // 2:]) > sum(start.merges[layers // 2:])
    # a block may turn merges into prunes, and neighbours trade the same kind
    kinds = {(t, g) for t, i, g, j in trades(layers, True, True) if i == j}
    assert kinds == {("merges", "prunes"), ("prunes", "merges")}
    assert all(t == g for t, i, g, j in trades(layers, True, True) if i != j)

    Pipeline([LearnedRates(flops=0.6, **QUICK)]).run(handle)
    chosen = handle.history[-1]["info"]["chosen"]
    losses = {k: chosen[f"loss_{k}"] for k in ("start", "learned", "exchanged")}
    assert chosen["kept"] in losses and losses[chosen["kept"]] == min(losses.values())
    assert chosen["trades"][0]["trade"] in ("start", "learned") and chosen["held_out_inputs"] + chosen["exchange_inputs"] <= 8


@pytest.mark.parametrize("samples, exchange_samples, batch", [(8, 128, 4), (400, 256, 4), (200, 64, 4), (3, 128, 4), (2, 1, 1)])
def test_calibration_rows_for_choice_exchanges_and_steps_do_not_overlap(samples, exchange_samples, batch):
    """The rows that choose the final schedule are never seen by the exchanges or the steps; the exchange rows are
    kept from the steps whenever a batch of rows is left for them."""
    from compressor.passes.learned_rates import calibration_split

    cfg = LearnedRates(flops=0.5, calibration_samples=samples, exchange_samples=exchange_samples, batch=batch).config
    held, polish, steps_from = calibration_split(cfg)
    assert held >= 1 and polish >= 1 and held + polish <= samples and steps_from >= held and steps_from < samples
    if samples - held - polish >= batch:
        assert steps_from == held + polish


def hard_counts_of(s, n):
    from compressor.program.token_cost import hard_counts

    return hard_counts(list(s.prunes), list(s.merges), n)


def test_latency_budget_searches_on_a_measured_block_table(minilm):
    """A latency budget times every block's attention and MLP at a grid of token counts (one table: MiniLM's blocks
    are alike), searches with that table as the cost, and times the compiled result against the dense program. The
    timings themselves are not asserted (speed targets live in benchmarks); the table's shape, that the search spent
    its predicted latency and the records are."""
    from compressor.passes.learned_rates.latency import LatencyTable

    handle = load("example:minilm")  # the example's 16 x 128: at the small test shapes timing noise rivals merging's gain
    Pipeline([LearnedRates(latency=0.7, **QUICK)]).run(handle)
    info = handle.history[-1]["info"]
    lat, attempts = info["latency"], info["latency"]["attempts"]
    table = lat["table"]
    assert table["grid"][0] == handle.adapter.protected_per_sample + 2 and table["grid"][-1] == handle.num_tokens
    (shape,) = table["shapes"]  # MiniLM's blocks are alike: one table serves all six
    assert shape["blocks"] == list(range(handle.num_layers)) and len(shape["attention_ms"]) == len(table["grid"])
    assert all(a <= b for a, b in zip(shape["attention_ms"], shape["attention_ms"][1:]))  # non-decreasing
    assert shape["mlp_ms"][-1] > shape["mlp_ms"][0] > 0 and table["dense_ms"] > 0
    assert info["cost"] == "latency table" and 1 <= len(attempts) <= 3
    assert all(set(a["check_ms"]) == {"dense", "learned"} and a["predicted_ratio"] <= a["target"] + 1e-4 for a in attempts)
    kept = min(attempts, key=lambda a: abs(a["measured_ratio"] - 0.7))  # the attempt that measured closest is compiled
    assert abs(info["target"] - kept["target"]) < 1e-3 and abs(info["flops_fraction"] - kept["flops_fraction"]) < 1e-3
    assert info["merges"] == kept["merges"] == handle.plan.merges and lat["measured_ratio"] == kept["measured_ratio"]
    assert info["flops_fraction"] < 0.95  # spending 30% of the latency removed real FLOPs
    # the table is differentiable in the counts and falls with fewer tokens
    t = LatencyTable(grid=(4, 64, 128), attention=((1.0, 2.0, 4.0),), mlp=((1.0, 3.0, 5.0),), fixed=1.0, dense=10.0)
    n = torch.tensor(96.0, requires_grad=True)
    t.fraction([(n, n)]).backward()
    assert abs(t.fraction([(128, 128)]) - 1.0) < 1e-9 and abs(n.grad.item() - (2 / 64 + 2 / 64) / 10) < 1e-6


def test_pass_learns_pruning_for_a_class_token_model(dinov2):
    handle = fresh(dinov2)
    assert handle.adapter.has_class_token
    Pipeline([LearnedRates(flops=0.5, **QUICK)]).run(handle)
    plan, rec = handle.plan, handle.history[-1]
    assert len(plan.prunes) == handle.num_layers and plan.prunes[0] == 0 and plan.prune_by == "cls_attention"
    assert rec["flops_after"] / rec["flops_before"] <= 0.51
    assert rec["info"]["search_seconds"] > 0 and rec["probe"]["cosine_to_previous_mean"] > 0.5


@pytest.mark.parametrize("options, message", [
    ({"flops": 0.5, "latency": 0.5}, "exactly one budget"),
    ({}, "exactly one budget"),
    ({"flops": 1.2}, "strictly between 0 and 1"),
    ({"flops": 0.0}, "strictly between 0 and 1"),
    ({"flops": 0.5, "prune": False, "merge": False}, "nothing to learn"),
    ({"flops": 0.5, "steps": 0}, ">= 1"),
    ({"flops": 0.5, "exchanges": -1}, "exchanges must be >= 0"),
    ({"flops": 0.5, "calibration_samples": 1}, "calibration_samples must be >= 2"),
])
def test_bad_options_are_one_line_usage_errors(options, message):
    with pytest.raises(UsageError, match=message) as e:
        LearnedRates(**options)
    assert "\n" not in str(e.value)


def test_cli_refuses_two_budgets_in_one_line(tmp_path):
    out = tmp_path / "out"
    r = compress("run", "--model", "example:minilm", "--pass", "learned_rates:flops=0.5,latency=0.5", "--output", str(out))
    assert r.returncode == 2 and "exactly one budget" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def test_pruning_a_mean_pooled_model_is_refused(minilm):
    handle = fresh(minilm)
    with pytest.raises(UsageError, match="class token") as e:
        LearnedRates(flops=0.5, prune=True, **QUICK).check(handle)
    assert "\n" not in str(e.value) and not handle.plan.active


def test_a_token_plan_already_set_is_refused(minilm):
    handle = fresh(minilm)
    handle.plan = TokenPlan(merges=[4] * handle.num_layers)
    with pytest.raises(UsageError, match="instead of token_merge"):
        LearnedRates(flops=0.5, **QUICK).check(handle)


@pytest.mark.slow
def test_learned_schedule_exports_and_validates(tmp_path):
    """The learned schedule (pruning and merging) compiles to ONNX through the ordinary build and passes validation."""
    out = build(tmp_path, "dinov2-learned", "example:dinov2-small", [{"name": "learned_rates", "flops": 0.6, **QUICK}],
                SMALL_IMAGE, samples=8, min_agreement=0.75, min_cosine_mean=0.7, min_cosine_p5=0.5)
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / "model.onnx").exists()
    record = next(p for p in manifest["passes"] if p["name"] == "learned_rates")
    assert record["info"]["prunes"] and record["info"]["merges"]
