"""The `compress` command as a user meets it: one-line errors with the right exit codes, never a traceback."""

import json
import os
import shlex
import stat
import sys
from pathlib import Path

import pytest

import subprocess

from compressor.cli import main
from compressor.sources.examples import EXAMPLES

from .conftest import compress


def compress_in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """`main(argv)` as the entry point runs it, without a new interpreter per case (imports cost seconds)."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["compress", *args], code, out, err)


def assert_one_line_error(done, code, fragment):
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    lines = [l for l in done.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], done.stderr


def test_help_on_every_command():
    for cmd in ([], ["run"], ["passes"], ["models"], ["inspect"], ["bench"], ["eval"]):
        done = compress(*cmd, "--help")
        assert done.returncode == 0 and "usage: compress" in done.stdout.lower(), done.stderr
    assert "--allow-cpu-fallback" in compress("bench", "--help").stdout


def test_model_help_and_bad_path_list_every_example(tmp_path, capsys):
    help_text = compress("run", "--help").stdout
    done = compress_in_process(capsys, "run", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "out"))
    assert_one_line_error(done, 2, "does not exist")
    for name in EXAMPLES:
        assert f"example:{name}" in help_text and f"example:{name}" in done.stderr


def test_shell_completion_comes_with_the_cli():
    # typer detects the shell from the parent process (its --show-completion takes no value here), so run under bash
    cmd = f"{shlex.quote(sys.executable)} -m compressor.cli --show-completion; exit $?"  # not exec-ed: bash stays the parent
    done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "_compress_completion" in done.stdout, done.stderr


def test_passes_lists_token_merge(capsys):
    done = compress_in_process(capsys, "passes")
    assert done.returncode == 0 and "token_merge" in done.stdout and "reduction" in done.stdout


def test_dry_run_prints_resolved_recipe(capsys):
    done = compress_in_process(capsys, "run", "examples/minilm-tome.toml", "--dry-run", "--pass", "token_merge:r=[4,4,4,4,4,4]")
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
    ([], 2, "Missing command"),
    (["compile"], 2, "No such command"),
    (["run", "--bogus"], 2, "No such option: --bogus"),
    (["run", "--model", "example:minilm", "--batch", "four", "--output", "OUT"], 2, "--batch"),
    (["bench"], 2, "Missing argument"),
    (["eval", "/no/such/artifact"], 2, "--perplexity"),
    (["bench", "/no/such/artifact", "--provider", "cpu,warp"], 2, "warp not available"),
])
def test_bad_input(tmp_path, capsys, args, code, fragment):
    (tmp_path / "empty").mkdir()
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "bad.toml").write_text("[model\nsource=")
    (tmp_path / "unknown.toml").write_text('[model]\nsource = "example:minilm"\n[speed]\nfast = true\n')
    subst = {"OUT": str(tmp_path / "out"), "EMPTY": str(tmp_path / "empty"), "GPT2": str(tmp_path / "gpt2"),
             "BADTOML": str(tmp_path / "bad.toml"), "UNKNOWNKEY": str(tmp_path / "unknown.toml")}
    done = compress_in_process(capsys, *[subst.get(a, a) for a in args])
    assert_one_line_error(done, code, fragment)
    assert not (tmp_path / "out").exists()


def test_errors_are_one_line_from_the_installed_command(tmp_path):
    for args, fragment in ([["run", "--bogus"], "No such option"], [["run", "--model", str(tmp_path), "--output", "o"], "no config.json"]):
        assert_one_line_error(compress(*args), 2, fragment)


@pytest.mark.parametrize("occupant, force, fragment", [
    ("artifact", False, "already exists"), ("notes.txt", True, "is not an artifact"), ("FILE/out", False, "writable")])
def test_output_is_checked_before_the_model_loads(tmp_path, occupant, force, fragment):
    """SliceGPT on SmolLM2 takes minutes: an occupied --output must be refused before any of it starts."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json" if occupant == "artifact" else out / occupant.replace("FILE/out", "file")).write_text("{}")
    target = out / "file" / "out" if occupant == "FILE/out" else out
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    done = compress("run", "--model", "example:smollm2", "--pass", "slicegpt:sparsity=0.25", "--output", str(target),
                    *(["--force"] if force else []), timeout=120)
    assert_one_line_error(done, 2, fragment)
    assert "pass 1/" not in done.stderr
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left beside it


@pytest.mark.slow
def test_validation_failure_exits_3_and_publishes_nothing(tmp_path):
    recipe = tmp_path / "strict.toml"
    recipe.write_text('[model]\nsource = "example:minilm"\n[[passes]]\nname = "token_merge"\nr = 30\n'
                      '[export]\nbatch = 4\nseq_len = 64\n[validation]\nsamples = 8\nmin_cosine_mean = 0.99999\n')
    done = compress("run", str(recipe), "--output", str(tmp_path / "out"))
    assert_one_line_error(done, 3, "validation failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["strict.toml"]


@pytest.mark.slow
def test_published_artifact_has_shareable_modes(minilm_artifact):
    umask = os.umask(0)
    os.umask(umask)
    for path in [minilm_artifact, *minilm_artifact.rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == want, path


@pytest.mark.slow
def test_inspect_and_bench_an_artifact(minilm_artifact, tmp_path):
    done = compress("inspect", str(minilm_artifact))
    assert done.returncode == 0 and "token_merge" in done.stdout and "64 -> 56" in done.stdout
    out = tmp_path / "bench.json"
    done = compress("bench", str(minilm_artifact), "--json", str(out), "--repeats", "3", "--warmup", "1")
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert {"dense_ms", "compressed_ms", "speedup", "flops_ratio"} <= set(result)
    assert result["flops_ratio"] > 1.3 and result["dense_ms"] > 0 and result["compressed_ms"] > 0


@pytest.mark.slow
def test_bench_falls_back_to_cpu_when_asked(minilm_artifact, tmp_path):
    missing = next(p for p in ("tensorrt", "cuda", "rocm") if not _available(p))
    refused = compress("bench", str(minilm_artifact), "--provider", missing)
    assert_one_line_error(refused, 2, "not available")
    out = tmp_path / "bench.json"
    done = compress("bench", str(minilm_artifact), "--provider", f"{missing},cpu", "--allow-cpu-fallback",
                    "--repeats", "2", "--warmup", "1", "--json", str(out))
    assert done.returncode == 0, done.stderr
    assert [l for l in done.stderr.splitlines() if l.startswith("warning:")][0].count("not available") == 1
    assert json.loads(out.read_text())["compressed_ms"] > 0


def _available(short_name: str) -> bool:
    import onnxruntime as ort

    from compressor.runtime.providers import full_name

    return full_name(short_name) in ort.get_available_providers()


def test_inspect_a_model_folder(minilm_folder):
    done = compress("inspect", str(minilm_folder), "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["model"]["family"] == "bert" and info["model"]["layers"] == 6 and info["flops"] > 0


@pytest.mark.parametrize("recipe", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "examples").glob("*.toml")))
def test_every_example_recipe_resolves(recipe, capsys):
    """Every bundled recipe parses and resolves (its passes and options exist) without loading the model."""
    done = compress_in_process(capsys, "run", f"examples/{recipe}", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "[model]" in done.stdout
