"""What a user of `compress run` relies on: a signal leaves nothing behind, two builds never race for one output,
--force replaces only an artifact, a failed bar says how to pass it, budgets time robustly, report says what is
missing. Real builds on MiniLM at small shapes; the rest in-process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .test_cli import assert_one_line_error, compress_in_process

# A cheap real build: MiniLM at 2 x 32 tokens, one merging pass, 4 validation samples.
SMALL = ["--model", "example:minilm", "--pass", "token_merge:r=4", "--batch", "2", "--seq-len", "32", "--samples", "4"]


def _temp_folders(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


def _wait_for_temp(parent: Path, alive=lambda: True, timeout: float = 300) -> None:
    """Until the build's temporary folder appears beside its output (the export has started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _temp_folders(parent):
            return
        if not alive():
            pytest.fail("the build ended before writing its temporary folder")
        time.sleep(0.02)
    pytest.fail("no temporary folder appeared")


@pytest.mark.slow  # loads MiniLM and starts its export
def test_sigterm_removes_the_temp_folder_and_a_second_build_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "compressor.cli", "run", *SMALL, "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_temp(tmp_path, lambda: proc.poll() is None)
        assert (tmp_path / ".out.lock").is_file()
        # a second build to the same output, while the first is minutes from publishing: refused, naming the first
        second = compress_in_process(capsys, "run", *SMALL, "--output", str(out))
        assert_one_line_error(second, 2, f"being built by another compress run (PID {proc.pid}")
        proc.send_signal(signal.SIGTERM)  # what `timeout` and job schedulers send
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert_one_line_error(subprocess.CompletedProcess([], 143, "", err), 143, "terminated by SIGTERM; nothing was published")
    assert sorted(os.listdir(tmp_path)) == []  # no temporary folder, no lock, no output


@pytest.mark.slow
def test_sighup_ends_a_build_like_ctrl_c(tmp_path, capsys):
    """In-process, the signal sent to ourselves once the temporary folder exists (a closed terminal sends SIGHUP)."""
    out = tmp_path / "deep" / "out"  # a parent the build creates, and removes again since nothing was published
    sent = threading.Event()

    def hang_up():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if (tmp_path / "deep").is_dir() and _temp_folders(tmp_path / "deep"):
                sent.set()
                os.kill(os.getpid(), signal.SIGHUP)
                return
            time.sleep(0.02)

    previous = signal.signal(signal.SIGHUP, lambda *_: None)  # a signal after main() returned must not end pytest
    try:
        watcher = threading.Thread(target=hang_up, daemon=True)
        watcher.start()
        done = compress_in_process(capsys, "run", *SMALL, "--output", str(out))
        watcher.join(5)
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert sent.is_set()
    assert_one_line_error(done, 129, "terminated by SIGHUP; nothing was published")
    assert sorted(os.listdir(tmp_path)) == []


HOLD = """
import sys, time
from compressor.artifact.lock import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_stale_scratch_is_swept_and_a_live_build_s_is_kept(tmp_path):
    """A build killed with SIGKILL (no handler runs) leaves its temporary folder and lock file; the next build into
    the same parent removes them, and never the scratch of a build that is still running."""
    from compressor.artifact.lock import output_lock

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "a")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        scratch = [".a.tmp-abc12345", ".a.old-123456", ".a.budget-0"]
        for name in scratch:
            (tmp_path / name).mkdir()
            (tmp_path / name / "model.onnx").write_bytes(b"x" * 1000)
        (tmp_path / ".notes.tmp-keep").mkdir()  # not a name a build makes: never touched
        (tmp_path / ".a.tmp-abc12346").write_text("a file, not a build's folder")
        with output_lock(tmp_path / "b"):
            pass
        assert sorted(os.listdir(tmp_path)) == sorted(scratch + [".a.lock", ".notes.tmp-keep", ".a.tmp-abc12346"])
        # a second build to the same output is refused while the first holds it
        from compressor.errors import UsageError

        with pytest.raises(UsageError, match=f"PID {holder.pid}"):
            with output_lock(tmp_path / "a"):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    finally:
        if holder.poll() is None:
            holder.kill()
    with output_lock(tmp_path / "b"):
        assert (tmp_path / ".b.lock").exists()
    assert sorted(os.listdir(tmp_path)) == [".a.tmp-abc12346", ".notes.tmp-keep"]


def test_force_replaces_only_an_artifact(tmp_path, capsys):
    (tmp_path / "file").write_text("my notes")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "manifest.json").write_text('{"name": "my package"}')
    (tmp_path / "link").symlink_to(junk)
    for name, fragment in [("file", "is a file, not an artifact folder"), ("junk", "is not an artifact"),
                           ("link", "is a symbolic link")]:
        done = compress_in_process(capsys, "run", *SMALL, "--force", "--output", str(tmp_path / name))
        assert_one_line_error(done, 2, fragment)
    assert (tmp_path / "file").read_text() == "my notes"
    assert sorted(os.listdir(tmp_path)) == ["file", "junk", "link"] and os.listdir(junk) == ["manifest.json"]


def test_a_failed_bar_says_how_to_pass_and_validate_relaxes_it(tmp_path, capsys, minilm_artifact):
    """A strict bar fails with the measured value, the bar and the flag that would pass; that flag then passes, and
    --force replaces the artifact that was there (whose manifest counts parameters one way)."""
    out = tmp_path / "out"
    shutil.copytree(minilm_artifact, out)
    before = (out / "manifest.json").read_bytes()
    args = ["run", *SMALL, "--output", str(out), "--force"]
    done = compress_in_process(capsys, *args, "--validate", "min_cosine_mean=0.99999", "--validate", "min_cosine_p5=0.5")
    assert_one_line_error(done, 3, "min_cosine_mean 0.99999")
    line = done.stderr.strip()
    assert "to pass, compress less" in line and "[validation] min_cosine_mean = " in line, line
    flags = line.split("relax the bar: ")[1].split(" (in a recipe")[0].split()
    assert flags[0] == "--validate" and flags[1].startswith("min_cosine_mean=0.")
    assert (out / "manifest.json").read_bytes() == before and sorted(os.listdir(tmp_path)) == ["out"]

    done = compress_in_process(capsys, *args, "--validate", "min_cosine_p5=0.5", *flags)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["validation"]["min_cosine_mean"] == float(flags[1].split("=")[1])
    assert manifest["shapes"]["seq_len"] == 32 and sorted(os.listdir(tmp_path)) == ["out"]  # the new artifact
    for m in (manifest, json.loads(before)):  # one count: the graph's (dense and compressed) and the model's
        assert m["model"]["params"] == m["params"]["compressed"] == m["params"]["dense"], m["params"]


@pytest.mark.parametrize("spec, fragment", [
    ("bogus=1", "KEY a [validation] key"), ("min_cosine_mean", "KEY a [validation] key"),
    ("min_cosine_mean=high", "needs a number"), ("samples=2.5", "a whole number of at least 1"),
    ("max_perplexity_ratio=nan", "must be a number"), ("max_perplexity_ratio=2", "do not apply to a text model")])
def test_validate_flag_is_checked_in_one_line(tmp_path, capsys, spec, fragment):
    done = compress_in_process(capsys, "run", *SMALL, "--validate", spec, "--output", str(tmp_path / "out"))
    assert_one_line_error(done, 2, fragment)
    assert os.listdir(tmp_path) == []


def test_validate_overrides_the_recipe_in_the_resolved_recipe(capsys):
    done = compress_in_process(capsys, "run", "examples/minilm-tome.toml", "--dry-run", "--validate", "min_cosine_p5=0.7",
                               "--validate", "samples=12")
    assert done.returncode == 0, done.stderr
    assert "min_cosine_p5 = 0.7\n" in done.stdout and "samples = 12\n" in done.stdout


def test_data_flag_sets_the_recipe_s_calibration(tmp_path, capsys):
    from compressor.pipeline.recipe import DATA_KEYS

    if "calibration" not in DATA_KEYS:
        pytest.skip("the recipe has no [data] calibration key yet (compressor.pipeline.recipe.DATA_KEYS)")
    texts = tmp_path / "calibration.txt"
    texts.write_text("\n".join(f"Sentence number {i} about a subject of its own, {i * 7 % 13} times over." for i in range(2000)))
    done = compress_in_process(capsys, "run", "--model", "example:minilm", "--pass", "width_prune:flops=0.8",
                               "--data", str(texts), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert f'calibration = "{texts}"' in done.stdout
    missing = compress_in_process(capsys, "run", *SMALL, "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "o"))
    assert_one_line_error(missing, 2, "does not exist")


def test_an_error_after_the_progress_display_started_is_one_line(tmp_path, capsys):
    """The model is checked inside the progress display; piped, its error is the only line (no blank line first)."""
    done = compress_in_process(capsys, "run", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "out"))
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, repr(done.stderr)
    assert os.listdir(tmp_path) == []


def test_report_says_which_command_fills_the_speed_columns(tmp_path, capsys):
    art = tmp_path / "art"
    art.mkdir()
    (art / "manifest.json").write_text(json.dumps({
        "validation": {"cosine_to_dense_mean": 0.98}, "flops": {"ratio": 1.4}, "passes": [{"name": "token_merge", "options": {"r": 8}}],
        "token_plan": {"token_counts": [64, 56, 48]}, "model": {}, "recipe": {}}))
    done = compress_in_process(capsys, "report", str(art), "--output", str(tmp_path / "r.html"))
    assert done.returncode == 0, done.stderr
    assert "compress bench ART --json ART/bench.json" in done.stdout and "for art" in done.stdout
    assert "compress bench ART --json ART/bench.json" in (tmp_path / "r.html").read_text()
    (art / "bench.json").write_text(json.dumps({"speedup": 1.3, "compressed_ms": 5.0}))
    done = compress_in_process(capsys, "report", str(art), "--output", str(tmp_path / "r.html"))
    assert done.returncode == 0 and "compress bench" not in done.stdout
    assert "compress bench" not in (tmp_path / "r.html").read_text()


class FakeClock:
    """Each timed callable advances this clock by its own duration: timing without waiting."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_paired_timing_interleaves_and_compares_medians():
    from compressor.measure.timing import time_paired

    clock, calls = FakeClock(), []

    def run(name, seconds):
        def fn():
            calls.append(name)
            clock.now += seconds() if callable(seconds) else seconds
        return fn

    spikes = iter([0.002, 0.050] + [0.002] * 1000)  # (the first is the warm-up run)  # one run of the candidate caught behind another job: 25x slower
    got = time_paired({"dense": run("dense", 0.003), "compressed": run("compressed", lambda: next(spikes))}, "dense",
                      warmup=1, clock=clock)
    assert calls[:2] == ["dense", "compressed"]  # warm-up, then rounds in alternating order
    assert got["order"] == ["dense", "compressed", "compressed", "dense"]
    assert got["ratio"]["compressed"] == pytest.approx(1.5)  # a ratio of medians: the spike does not move it
    assert got["rounds"] == 8 and got["uncertainty"]["compressed"] < 0.025  # steady: the fewest rounds

    import random

    rng = random.Random(0)
    noisy = lambda: 0.002 * rng.uniform(0.6, 1.6)  # noqa: E731  another job on the cores
    got = time_paired({"dense": run("dense", lambda: 0.003 * rng.uniform(0.6, 1.6)), "compressed": run("compressed", noisy)},
                      "dense", clock=clock, max_rounds=30)
    assert got["rounds"] == 30 and got["spread"]["compressed"] > 0.2  # more rounds while wide, up to the cap
    assert got["uncertainty"]["compressed"] > 0.025 and 1.2 < got["ratio"]["compressed"] < 1.8


def test_a_noisy_budget_miss_says_so():
    from compressor.pipeline.budget import noise_note, parse_budget

    budget = parse_budget("speedup=1.5")
    assert noise_note({"speedup": 1.9, "uncertainty": 0.01, "rounds": 8, "spread": 0.03}, budget) == ""
    note = noise_note({"speedup": 1.91, "uncertainty": 0.12, "rounds": 40, "spread": 0.4}, budget)
    assert "noisy" in note and "+-12%" in note and "40 interleaved rounds" in note and "quiet" in note


def test_a_signal_while_publishing_waits_for_both_renames(tmp_path, monkeypatch):
    """SIGTERM between moving the old artifact aside and renaming the new one into place would leave neither at the
    output: publishing holds signals until both renames are done, then the signal ends the run as usual."""
    from compressor.cli.signals import terminate_on_signals
    from compressor.errors import Terminated
    from compressor.artifact import publish as compile_module
    from compressor.artifact.lock import was_published

    out, new = tmp_path / "out", tmp_path / ".out.tmp-abcdefgh"
    for folder, text in ((out, "old"), (new, "new")):
        folder.mkdir()
        (folder / "model.onnx").write_text(text)
    real_note = compile_module.note_published

    def signal_midway(output):  # runs after the old artifact moved aside and the new one took its place
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # a handler that is not held would raise here, mid-publish
        real_note(output)

    monkeypatch.setattr(compile_module, "note_published", signal_midway)
    with terminate_on_signals(), pytest.raises(Terminated):
        compile_module.publish(new, out)
    assert (out / "model.onnx").read_text() == "new" and was_published(out)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the old artifact removed, nothing left aside
