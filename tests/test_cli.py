"""The `compress` command as a user meets it: one-line errors with the right exit codes, never a traceback."""

import json

import pytest

from .conftest import compress


def assert_one_line_error(done, code, fragment):
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    lines = [l for l in done.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], done.stderr


def test_help_on_every_command():
    for cmd in ([], ["run"], ["passes"], ["inspect"], ["bench"]):
        done = compress(*cmd, "--help")
        assert done.returncode == 0 and "usage:" in done.stdout


def test_passes_lists_token_merge():
    done = compress("passes")
    assert done.returncode == 0 and "token_merge" in done.stdout and "reduction" in done.stdout


def test_dry_run_prints_resolved_recipe():
    done = compress("run", "examples/minilm-tome.toml", "--dry-run", "--pass", "token_merge:r=[4,4,4,4,4,4]")
    assert done.returncode == 0, done.stderr
    assert 'source = "example:minilm"' in done.stdout and "r = [" in done.stdout and "seq_len = 128" in done.stdout


@pytest.mark.parametrize("args, code, fragment", [
    (["run", "--model", "/no/such/model", "--output", "OUT"], 2, "does not exist"),
    (["run", "--model", "EMPTY", "--output", "OUT"], 2, "no config.json"),
    (["run", "--model", "GPT2", "--output", "OUT"], 2, "no adapter for model type 'gpt2'"),
    (["run", "--model", "example:nope", "--output", "OUT"], 2, "unknown example"),
    (["run", "--model", "example:minilm", "--pass", "tome:r=8", "--output", "OUT"], 2, "unknown pass 'tome'"),
    (["run", "--model", "example:minilm", "--pass", "token_merge:speed=2", "--output", "OUT"], 2, "no option speed"),
    (["run", "--model", "example:minilm", "--pass", "token_merge:r=[99,0,0,0,0,0]", "--output", "OUT"], 2, "at most"),
    (["run", "BADTOML", "--output", "OUT"], 2, "not valid TOML"),
    (["run", "UNKNOWNKEY", "--output", "OUT"], 2, "unknown section"),
    (["run", "examples/minilm-tome.toml"], 2, "--output"),
    (["bench", "/no/such/artifact"], 2, "does not exist"),
    (["inspect", "/no/such/thing"], 2, "does not exist"),
])
def test_bad_input(tmp_path, args, code, fragment):
    (tmp_path / "empty").mkdir()
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "bad.toml").write_text("[model\nsource=")
    (tmp_path / "unknown.toml").write_text('[model]\nsource = "example:minilm"\n[speed]\nfast = true\n')
    subst = {"OUT": str(tmp_path / "out"), "EMPTY": str(tmp_path / "empty"), "GPT2": str(tmp_path / "gpt2"),
             "BADTOML": str(tmp_path / "bad.toml"), "UNKNOWNKEY": str(tmp_path / "unknown.toml")}
    done = compress(*[subst.get(a, a) for a in args])
    assert_one_line_error(done, code, fragment)
    assert not (tmp_path / "out").exists()


def test_validation_failure_exits_3_and_publishes_nothing(tmp_path):
    recipe = tmp_path / "strict.toml"
    recipe.write_text('[model]\nsource = "example:minilm"\n[[passes]]\nname = "token_merge"\nr = 30\n'
                      '[export]\nbatch = 4\nseq_len = 64\n[validation]\nsamples = 8\nmin_cosine_mean = 0.99999\n')
    done = compress("run", str(recipe), "--output", str(tmp_path / "out"))
    assert_one_line_error(done, 3, "validation failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["strict.toml"]


def test_inspect_and_bench_an_artifact(minilm_artifact, tmp_path):
    done = compress("inspect", str(minilm_artifact))
    assert done.returncode == 0 and "token_merge" in done.stdout and "64 -> 56" in done.stdout
    out = tmp_path / "bench.json"
    done = compress("bench", str(minilm_artifact), "--json", str(out), "--repeats", "3", "--warmup", "1")
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert {"dense_ms", "compressed_ms", "speedup", "flops_ratio"} <= set(result)
    assert result["flops_ratio"] > 1.3 and result["dense_ms"] > 0 and result["compressed_ms"] > 0


def test_inspect_a_model_folder(minilm_folder):
    done = compress("inspect", str(minilm_folder), "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["model"]["family"] == "bert" and info["model"]["layers"] == 6 and info["flops"] > 0
