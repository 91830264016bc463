"""The kv_cache pass: a KV budget compiled into the fused decoder (position_ids in, attention probabilities out) and
kept by the torch-free runtime (runtime/kv_policy.py); its refusals, one line each.

The graph tests use a small random Qwen2 (tests/test_decoder_families.py): the properties checked are exact
(positions, which slot is freed, bit-equal rows, probabilities that sum to one), so random weights are as good as
real ones here; what a budget costs in quality on real long text is measured by benchmarks/kv_cache.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from compressor.lower.fused_decoder import LoweringOptions, lower_decoder
from compressor.runtime.decode import SharedKVDecoder
from compressor.runtime.errors import FeedError
from compressor.runtime.kv_policy import KVBudget, PolicyDecoder
from compressor.sources.source import load_source

from .conftest import build, compress
from .test_decoder_families import make_model

MAX_LENGTH = 128
ARTIFACT_MAX = 600  # compress bench prefills 512 tokens


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict:
    """The small model lowered three ways: plain, with position_ids, with position_ids and probabilities."""
    root = tmp_path_factory.mktemp("kv")
    folder = make_model("qwen2", root / "qwen2")
    ad, _ = load_source(str(folder))
    out = {"folder": folder, "head_dim": ad.head_dim, "kv": list(ad.kv_heads), "heads": ad.layers[0].heads}
    for name, flags in (("plain", {}), ("positions", {"position_ids": True}),
                        ("scores", {"position_ids": True, "attention_probs": True})):
        lower_decoder(ad, root / f"{name}.onnx", LoweringOptions(max_length=MAX_LENGTH, **flags))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        out[name] = ort.InferenceSession(str(root / f"{name}.onnx"), opts, providers=["CPUExecutionProvider"])
    return out


def decoder(graphs, policy: KVBudget, prompt_len: int, graph: str = "scores") -> PolicyDecoder:
    return PolicyDecoder(graphs[graph], graphs["kv"], graphs["head_dim"], policy, prompt_len, MAX_LENGTH)


def prompt(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, 1000, n).tolist()


def full(n: int, recent: int = 32) -> KVBudget:
    return KVBudget("window", n + 1, sinks=0, recent=recent)


def test_position_ids_graph_decodes_exactly_as_the_plain_graph(graphs):
    """With every token kept, the policy graph (positions from the runtime, probabilities out) gives the plain
    graph's logits at every step: the new input and outputs change nothing until a slot is freed."""
    ids = prompt(40)
    plain = SharedKVDecoder(graphs["plain"], graphs["kv"], graphs["head_dim"], 1, 64)
    ref = [plain.prefill([ids[:30]], chunk=8)[0]] + [plain.step(np.array([t]))[0] for t in ids[30:]]
    for graph in ("positions", "scores"):
        d = decoder(graphs, full(40), 30, graph)
        got = [d.prefill(ids[:30], chunk=8)] + [d.step(t) for t in ids[30:]]
        assert np.abs(np.stack(got) - np.stack(ref)).max() < 1e-4


def test_sliding_window_layers_keep_their_window_under_a_policy_graph(tmp_path):
    """Gemma 3 (local layers with a 6-slot window here): the position_ids graph with every token kept decodes as the
    plain graph, past the window; a window budget below it keeps sinks + newest."""
    ad, _ = load_source(str(make_model("gemma3", tmp_path / "g")))
    sessions = {}
    for name, flags in (("plain", {}), ("positions", {"position_ids": True})):
        lower_decoder(ad, tmp_path / f"{name}.onnx", LoweringOptions(max_length=MAX_LENGTH, **flags))
        sessions[name] = ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    kv, ids = list(ad.kv_heads), prompt(40)
    plain = SharedKVDecoder(sessions["plain"], kv, ad.head_dim, 1, 64)
    ref = [plain.prefill([ids[:30]], chunk=8)[0]] + [plain.step(np.array([t]))[0] for t in ids[30:]]
    d = PolicyDecoder(sessions["positions"], kv, ad.head_dim, full(40), 30, MAX_LENGTH, min_rows=6)
    got = [d.prefill(ids[:30], chunk=8)] + [d.step(t) for t in ids[30:]]
    assert np.abs(np.stack(got) - np.stack(ref)).max() < 1e-4
    d = PolicyDecoder(sessions["positions"], kv, ad.head_dim, KVBudget("window", 5, sinks=1), 30, MAX_LENGTH, min_rows=6)
    d.prefill(ids[:30], chunk=8)
    for t in ids[30:]:
        d.step(t)
    assert (d.positions() == [0, 36, 37, 38, 39]).all()


def test_attention_probabilities_sum_to_one_per_query(graphs):
    """output_qk is wired: after a prefill of n tokens, each key/value head has received n x (query heads per
    key/value head) of attention mass in all."""
    n = 50
    d = decoder(graphs, KVBudget("h2o", 20), n)
    d.feed_prompt(prompt(n), chunk=16)
    group = graphs["heads"] // graphs["kv"][0]
    assert np.allclose(d.h2o[..., :d.L].sum(-1), n * group, rtol=1e-4)
    assert (d.h2o[..., :d.L] > 0).all()


def test_window_keeps_the_sinks_and_the_newest_with_bit_equal_rows(graphs):
    """StreamingLLM: after an exact prefill, the kept rows are the full cache's rows at the sinks and the newest
    positions, bit for bit; every decode step keeps exactly sinks + newest, freeing the oldest non-sink slot."""
    n, budget, sinks = 60, 16, 3
    ids = prompt(n)
    whole = decoder(graphs, full(n + 20), n)
    whole.prefill(ids, chunk=16)
    d = decoder(graphs, KVBudget("window", budget, sinks=sinks), n)
    d.prefill(ids, chunk=16)
    expect = list(range(sinks)) + list(range(n - (budget - sinks), n))
    assert (d.positions() == expect).all()
    assert np.array_equal(d.buf[..., :budget, :], whole.buf[..., expect, :])
    for t in prompt(20, seed=1):
        d.step(t)
        assert d.L == budget
        assert (d.positions() == list(range(sinks)) + list(range(d.pos - (budget - sinks), d.pos))).all()


def test_slot_order_does_not_matter_and_positions_are_kept(graphs):
    """The claim the in-place ring rests on: a decode step over a past holding the kept rows in any order, with the
    token's original position, gives the same logits as the policy decoder's own step."""
    n, budget = 50, 12
    ids = prompt(n)
    d = decoder(graphs, KVBudget("window", budget, sinks=2), n, graph="positions")
    d.prefill(ids, chunk=16)
    past = {}
    order = np.random.default_rng(0).permutation(d.L)
    for i, kv in enumerate(graphs["kv"]):
        for j, kind in enumerate(("key", "value")):
            past[f"past_key_values.{i}.{kind}"] = np.ascontiguousarray(d.buf[i, j, :, :kv, :d.L][:, :, order])
    feeds = {"input_ids": np.array([[7]]), "attention_mask": np.ones((1, d.L + 1), np.int64),
             "position_ids": np.array([[d.pos]]), **past}
    shuffled = graphs["positions"].run(["logits"], feeds)[0][0, -1]
    assert np.abs(d.step(7) - shuffled).max() < 1e-5


def test_h2o_frees_the_least_attended_slot_outside_sinks_and_recent(graphs):
    """One eviction on a hand-set state: per layer and head, the candidate with the smallest accumulated score is
    freed and the newest row moves into it; sinks and recent tokens are never candidates, however low their score."""
    d = decoder(graphs, KVBudget("h2o", 8, sinks=2, recent=3), 8)
    d.prefill(prompt(9)[:8], chunk=8)
    d._run(np.array([5]), want_probs=False)  # 9 rows resident, budget 8: one must go
    rng = np.random.default_rng(3)
    d.score[..., :9] = rng.random(d.score[..., :9].shape) + 1.0
    d.score[..., 0] = d.score[..., 7] = 0.0  # a sink and a recent token: lowest scores, still kept
    before_rows = d.buf.copy()
    expect = 2 + np.argmin(d.score[..., 2:6], axis=-1)  # candidates: positions 2..5 (slots 2..5 here)
    d._evict_one()
    assert d.L == 8
    for l in range(len(graphs["kv"])):
        for h in range(graphs["kv"][l]):
            slot = expect[l, h]
            assert d.slot_pos[l, h, slot] == 8
            assert np.array_equal(d.buf[l, :, 0, h, slot], before_rows[l, :, 0, h, 8])
            assert sorted(d.slot_pos[l, h, :8]) == sorted(set(range(9)) - {slot})


def test_snapkv_keeps_per_head_the_prompt_positions_its_window_attends_to(graphs):
    n = 64
    d = decoder(graphs, KVBudget("snapkv", 24, sinks=2, recent=8, pool=3), n)
    d.feed_prompt(prompt(n), chunk=16)
    obs = d.obs[..., :n].copy()
    d.finish_prefill()
    free = 24 - 2 - 8
    for l in range(len(graphs["kv"])):
        for h in range(graphs["kv"][l]):
            kept = set(d.positions()[l, h].tolist())
            assert set(range(2)) | set(range(n - 8, n)) <= kept and len(kept) == 24
            chosen = sorted(kept - set(range(2)) - set(range(n - 8, n)))
            dropped = sorted(set(range(2, n - 8)) - kept)
            assert len(chosen) == free and obs[l, h, chosen].min() >= obs[l, h, dropped].max()  # (pooling ties)
    assert len({tuple(d.positions()[0, h]) for h in range(graphs["kv"][0])}) > 1  # heads choose differently


@pytest.mark.parametrize("policy", ["window", "h2o", "snapkv"])
def test_a_fork_of_one_prefill_equals_its_own_prefill(graphs, policy):
    """The benchmark's shortcut (one full-attention prefill, forked per policy) is the policy's exact prefill."""
    n, ids = 70, prompt(70)
    base = decoder(graphs, full(n + 10, recent=8), n)  # (its last call: snapkv's 8-token observation window)
    first = base.feed_prompt(ids, chunk=16)
    budget = KVBudget(policy, 30, sinks=2, recent=8)
    fork = base.fork(budget)
    fork.finish_prefill()
    own = decoder(graphs, budget, n)
    assert np.array_equal(own.prefill(ids, chunk=16), first)
    for t in prompt(10, seed=2):
        assert np.array_equal(fork.step(t), own.step(t))
        assert np.array_equal(fork.positions(), own.positions())


def test_stream_prefill_stays_within_budget_plus_a_chunk(graphs):
    n, budget, chunk = 100, 20, 16
    d = decoder(graphs, KVBudget("h2o", budget, sinks=2, recent=4, prefill="stream"), n)
    d.prefill(prompt(n), chunk=chunk)
    assert d.peak_rows <= budget + chunk and d.L == budget
    assert (d.positions()[..., :2] == [0, 1]).all() and (d.positions()[..., -4:] == list(range(n - 4, n))).all()


def test_default_recent_windows_follow_the_papers():
    """h2o splits its budget between heavy hitters and recent tokens (H2O's default); snapkv observes the last 32
    prompt tokens (SnapKV's); window keeps the newest by rank, protecting only its sinks."""
    assert KVBudget("h2o", 100, sinks=4).recent_for(100) == 48
    assert KVBudget("h2o", 100, sinks=4, recent=10).recent_for(100) == 10
    assert KVBudget("snapkv", 100).recent_for(100) == 32 == KVBudget("snapkv", 100).observation
    assert KVBudget("window", 100).recent_for(100) == 0
    assert KVBudget("h2o", 0.1).slots(1000) == 100 and KVBudget("h2o", 0.001, sinks=4).slots(1000) == 6


def test_runtime_refusals_are_its_own_one_line_errors(graphs):
    with pytest.raises(FeedError, match="at least 7 slots"):
        KVBudget.from_dict({"policy": "h2o", "budget": 5, "sinks": 2, "recent": 4}, True)
    with pytest.raises(FeedError, match="does not return"):
        KVBudget.from_dict({"policy": "h2o", "budget": 64}, has_scores=False)
    with pytest.raises(FeedError, match="takes a dict with keys"):
        KVBudget.from_dict({"policy": "window", "slots": 64}, True)
    d = decoder(graphs, KVBudget("window", 16), MAX_LENGTH - 2)
    d.prefill(prompt(MAX_LENGTH - 2), chunk=32)
    d.step(5)
    with pytest.raises(FeedError, match=f"max_length = {MAX_LENGTH}"):
        d.step(5)
        d.step(5)


REFUSALS = [
    ({"policy": "h2o", "budget": 20, "sinks": 4, "recent": 16}, {}, "smaller than what the policy always keeps"),
    ({"budget": 1.5}, {}, "must lie in (0, 1)"),
    ({"policy": "snapkv", "prefill": "stream"}, {}, "use prefill = \"exact\""),
    ({"policy": "tova"}, {}, "policy must be one of window, h2o, snapkv"),
    ({"budget": 4096}, {"max_length": 4096}, "not below the artifact's context"),
    ({"budget": 256}, {"lowering": "generic"}, "needs the fused decoder lowering"),
]


@pytest.mark.parametrize("options,export,message", REFUSALS)
def test_recipe_refusals_are_one_line_before_any_model_loads(tmp_path, options, export, message):
    recipe = {"model": {"source": "example:smollm2"}, "passes": [{"name": "kv_cache", **options}], "export": export}
    path = tmp_path / "r.toml"
    path.write_text(toml(recipe))
    done = compress("run", str(path), "--dry-run")
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_an_encoder_recipe_is_refused_in_one_line(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(toml({"model": {"source": "example:minilm"}, "passes": [{"name": "kv_cache", "budget": 64}]}))
    done = compress("run", str(path), "--dry-run")
    assert done.returncode == 2 and "applies to language models" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def toml(recipe: dict) -> str:
    """The recipe as a user writes it (not through our own parser, which would refuse it first)."""
    def value(v):
        return json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)

    lines = [f"[model]", f"source = {value(recipe['model']['source'])}"]
    for p in recipe.get("passes", []):
        lines += ["[[passes]]"] + [f"{k} = {value(v)}" for k, v in {"name": "kv_cache", **p}.items()]
    if recipe.get("export"):
        lines += ["[export]"] + [f"{k} = {value(v)}" for k, v in recipe["export"].items()]
    return "\n".join(lines) + "\n"


def test_sliding_window_family_refuses_scores_and_wide_budgets(tmp_path):
    """Gemma 3's local layers attend to their last `sliding_window` slots, and GroupQueryAttention returns no
    probabilities for them: h2o is refused, and window only with fewer slots than the window."""
    from compressor.errors import UsageError

    folder = make_model("gemma3", tmp_path / "g")
    for options, message in (({"policy": "h2o", "budget": 5, "sinks": 1, "recent": 2}, "use policy = \"window\""),
                             ({"policy": "window", "budget": 8, "sinks": 1}, "below 6")):
        with pytest.raises(UsageError, match=message):
            build(tmp_path, "g-out", str(folder), [{"name": "kv_cache", **options}], {"max_length": 64}, samples=None)
        assert not (tmp_path / "g-out").exists()


@pytest.fixture(scope="module")
def artifact(graphs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kv-artifact")
    passes = [{"name": "layer_prune", "blocks": 1, "metric": "depth", "keep_last": False},  # composes with pruning
              {"name": "kv_cache", "policy": "h2o", "budget": 24, "sinks": 2, "recent": 4}]
    return build(root, "q", str(graphs["folder"]), passes,
                 {"weights": "int4", "block_size": 16, "max_length": ARTIFACT_MAX}, samples=None,
                 perplexity_windows=1, window_len=64, max_perplexity_ratio=100.0, greedy_prompts=1, greedy_tokens=4,
                 min_greedy_agreement=0.0)


def test_the_artifact_records_the_policy_and_generates_under_it_torch_free(artifact):
    m = json.loads((artifact / "manifest.json").read_text())
    assert m["preprocess"]["kv_policy"]["policy"] == "h2o" and m["preprocess"]["kv_policy"]["budget"] == 24
    assert [p["name"] for p in m["passes"]] == ["layer_prune", "kv_cache"] and m["preprocess"]["num_layers"] == 1
    kv = m["validation"]["kv_policy"]  # validated at compile time: held-out prompt longer than the budget
    assert kv["evicts"] and kv["slots"] == 24 and kv["prompt_tokens"] == ARTIFACT_MAX - 128 - 2
    assert kv["perplexity_policy"] > 0 and kv["perplexity_full"] > 0 and 0.0 <= kv["teacher_forced_agreement"] <= 1.0
    assert m["inputs"][2]["name"] == "position_ids"
    assert sum(o["name"].startswith("attention_probs.") for o in m["outputs"]) == len(m["preprocess"]["kv_heads"])
    assert m["export"]["lowering"]["kv_policy_io"] == {"position_ids": True, "attention_probs": True}
    assert not m["export"]["genai"]["written"] and "h2o" in m["export"]["genai"]["why"]
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "transformers", "onnx", "onnxscript"):
            sys.modules[name] = None
        from compressor.runtime import load
        lm = load({str(artifact)!r})
        ids = list(range(5, 65))
        short = lm.generate(ids[:10], max_new_tokens=8, stop_on_eos=False)  # never reaches the budget
        lm.kv_policy = None
        assert short == lm.generate(ids[:10], max_new_tokens=8, stop_on_eos=False)
        lm.kv_policy = {{"budget": 16}}
        d = lm.policy_decoder(len(ids), 12)
        d.prefill(ids, lm.policy_chunk)
        for t in range(12):
            d.step(5 + t)
        assert d.L == 16 and d.budget == 16
        batch = lm.generate_batch([ids[:30], ids], max_new_tokens=5, stop_on_eos=False)  # one prompt at a time
        assert batch == [lm.generate(ids[:30], max_new_tokens=5, stop_on_eos=False),
                         lm.generate(ids, max_new_tokens=5, stop_on_eos=False)]
        lp = lm.continuation_logprobs(ids, [7, 8, 9])
        assert lp.shape == (3,) and (lp < 0).all()
        print(len(lm.generate(ids, max_new_tokens=12, stop_on_eos=False)))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "12"


def test_inspect_shows_the_policy(artifact):
    done = compress("inspect", str(artifact), "--json")
    assert done.returncode == 0, done.stderr
    kv = json.loads(done.stdout)["kv_cache"]
    assert kv == {"max_length": ARTIFACT_MAX, "policy": "h2o", "sinks": 2, "prefill": "exact", "budget": 24, "recent": 4}


def test_bench_adds_long_prompt_rows(artifact, tmp_path):
    """`compress bench` on a policy artifact times decode after long prompts, full cache and policy in turn."""
    out = tmp_path / "b.json"
    done = compress("bench", str(artifact), "--no-baselines", "--repeats", "2", "--warmup", "0",
                    "--long-prompts", "40,max", "--json", str(out))
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["long_prompt"]
    assert [r["prompt"] for r in rows] == [40, ARTIFACT_MAX - 28]
    assert all(r["slots"] == 24 and r["full_ms"] > 0 and r["policy_ms"] > 0 for r in rows)
    assert rows[1]["policy_kv_mb"] < rows[1]["full_kv_mb"]
    assert "long prompts" in done.stdout
    bad = compress("bench", str(artifact), "--no-baselines", "--long-prompts", "100000")
    assert bad.returncode == 2 and "--long-prompts takes lengths" in bad.stderr
