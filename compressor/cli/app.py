"""The `compress` command (typer, rich help, shell completion): a thin layer over the Python API.

Exit codes: 0 success, 1 failure, 2 usage or input error, 3 validation failed (no artifact published), 130
interrupted (Ctrl-C), 143 terminated (SIGTERM), 129 hung up (SIGHUP); after a signal the build's temporary folder is
removed and nothing is published. Every error is one line on stderr, never a traceback. `main(argv)` returns the exit
code, so tests and scripts can call it in-process.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from compressor.cli.bars import progress_bars
from compressor.cli.show import (PassPrinter, consoles, print_bench, print_inspect, print_models, print_passes,
                                 print_summary, write_json)
from compressor.cli.signals import terminate_on_signals
from compressor.errors import (EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, CompressorError, Terminated,
                               UsageError)
from compressor.sources.examples import EXAMPLES

_print_summary = print_summary  # the name tests and older callers import
KNOWN_SOURCES = "a Hugging Face folder, a .gguf file, or " + " / ".join(f"example:{name}" for name in EXAMPLES)
_building: list[Path] = []  # the --output of the `run` in progress, for the message if a signal ends it

app = typer.Typer(name="compress", help="Ahead-of-time compression compiler for transformers.",
                  pretty_exceptions_enable=False, rich_markup_mode="rich",
                  context_settings={"help_option_names": ["-h", "--help"]})


# ---------------------------------------------------------------- run
@app.command(short_help="compile a model with a recipe (or --model/--pass) into a verified artifact")
def run(
    recipe: Annotated[Optional[str], typer.Argument(help="recipe TOML file (see examples/)", show_default=False)] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="artifact folder to write")] = None,
    model: Annotated[Optional[str], typer.Option(help=f"model source: {KNOWN_SOURCES} (overrides the recipe)")] = None,
    passes: Annotated[Optional[list[str]], typer.Option(
        "--pass", metavar="NAME:K=V,...",
        help="a pass with options, e.g. token_merge:r=8 (repeatable; replaces the recipe's passes)")] = None,
    batch: Annotated[Optional[int], typer.Option(help="compiled batch size")] = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="compiled sequence length (text)")] = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="compiled square image size (vision)")] = None,
    samples: Annotated[Optional[int], typer.Option(help="held-out validation samples")] = None,
    validate: Annotated[Optional[list[str]], typer.Option(
        "--validate", metavar="KEY=VALUE",
        help="a validation bar or count, e.g. max_perplexity_ratio=1.7 or min_cosine_mean=0.9 (repeatable; the keys "
             "of a recipe's \\[validation] table; overrides the recipe's value)")] = None,
    data: Annotated[Optional[str], typer.Option(
        "--data", metavar="PATH",
        help="calibration data for the passes that calibrate: a text file (one text per line) or an image folder "
             "(the recipe's \\[data] calibration)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the fully resolved recipe and exit")] = False,
    force: Annotated[bool, typer.Option("--force", help="replace an existing artifact at --output")] = False,
    budget: Annotated[Optional[str], typer.Option(
        metavar="KEY=VALUE", help="let the compiler pick the passes: speedup=2.0, flops=0.5, params=0.8 or latency_ms=120 "
                                  "(measured ones on this machine; exit 3 if missed by more than 5%); a speed-up may "
                                  "name its dense baseline: speedup=2.0,against=fused (static, fused or fused_int8)")] = None,
) -> None:
    """Compile a model into a validated ONNX artifact. Exit 3 if validation fails (nothing is published)."""
    from compressor.pipeline.recipe import Recipe, load_recipe, parse_pass_spec

    if recipe:
        parsed = load_recipe(recipe)
        if model:
            parsed.source = model
        if passes:
            parsed.passes = [parse_pass_spec(s) for s in passes]
    elif model:
        parsed = Recipe(model, [parse_pass_spec(s) for s in (passes or [])])
    else:
        raise UsageError("give a recipe file or --model PATH (with --pass NAME:key=value ...)")
    for key, value in (("batch", batch), ("seq_len", seq_len), ("image_size", image_size)):
        if value is not None:
            parsed.export[key] = value
    if samples is not None:
        parsed.validation["samples"] = samples
    if validate:
        from compressor.targets import validation_key_types
        from compressor.validation.bars import parse_validation_override

        keys = validation_key_types()
        parsed.validation.update(parse_validation_override(spec, keys) for spec in validate)
    if data is not None:
        parsed.data["calibration"] = calibration_path(data)
        parsed.data.pop("calibration_sha256", None)  # a manifest's recipe rerun on other data: record the new data
    parsed_budget = None
    if budget is not None:
        from compressor.pipeline.budget import check_budget_recipe, parse_budget

        parsed_budget = parse_budget(budget)
        check_budget_recipe(parsed)
    err, out = consoles()
    if dry_run:
        from compressor.pipeline.recipe import resolve_recipe

        out.print(resolve_recipe(parsed).to_toml(), markup=False, highlight=False, soft_wrap=True)  # TOML: never wrapped
        return
    if not output:
        raise UsageError("--output DIR is required (where the artifact is written)")
    check_output_free(Path(output), force)  # now, not after minutes of passes
    from compressor.artifact.publish import check_output
    from compressor.artifact.lock import output_lock
    from compressor.pipeline.build import run_recipe

    _building[:] = [Path(output)]
    with output_lock(output):  # one build per output; held to the end (run_recipe / run_budget take it reentrantly)
        check_output(Path(output), force)  # again under the lock: a build that just finished may have published there
        with progress_bars(err, "loading model") as bars:
            if parsed_budget is not None:
                from compressor.pipeline.budget import run_budget

                manifest = run_budget(parsed, parsed_budget, output, force=force, progress=bars.step, log=bars.note)
            else:
                manifest = run_recipe(parsed, output, force=force, instruments=[PassPrinter(err, bars)], progress=bars.step)
    print_summary(out, manifest, output)
    if "budget" in manifest:
        b = manifest["budget"]
        out.print(f"budget: requested {b['requested']}, measured " + ", ".join(f"{k} {v:.3g}" for k, v in b["measured"].items()),
                  markup=False, highlight=False, soft_wrap=True)


def calibration_path(path: str) -> str:
    """--data PATH: it must exist (a typo is refused now, not after loading the model); kept absolute, since a
    recipe's own relative paths are read relative to the recipe file."""
    from compressor.pipeline.recipe import DATA_KEYS

    if "calibration" not in DATA_KEYS:
        raise UsageError("--data needs a compressor whose recipes take [data] calibration; this one does not yet")
    if not Path(path).expanduser().exists():
        raise UsageError(f"--data '{path}' does not exist; give a text file (one text per line) or an image folder")
    return str(Path(path).expanduser().absolute())


def check_output_free(output: Path, force: bool) -> None:
    """The checks publishing makes at the end, made before any model is loaded: the folder is free (or --force
    replaces an artifact), and the nearest existing parent is a folder we can write into."""
    from compressor.artifact.publish import check_output

    check_output(output, force)
    parent = output.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write the artifact under '{parent}' (not a writable folder); choose another --output")


# ---------------------------------------------------------------- passes, models
@app.command()
def passes() -> None:
    """list registered passes with their options and defaults"""
    print_passes(consoles()[1])


@app.command()
def models(as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False) -> None:
    """list supported model families: model types, modality, passes that apply, example checkpoints"""
    from compressor.cli.families import model_families

    rows = model_families()
    out = consoles()[1]
    if as_json:
        out.print_json(json.dumps(rows))
    else:
        print_models(out, rows)


# ---------------------------------------------------------------- inspect
@app.command()
def inspect(
    path: Annotated[str, typer.Argument(help=f"artifact folder, or a model: {KNOWN_SOURCES}", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """show a model folder, example or artifact: architecture, params, FLOPs, tokens per layer"""
    from compressor.cli.inspect_model import inspect_path

    err, out = consoles()
    with err.status("inspecting..."):
        info = inspect_path(path)
    if as_json:
        out.print_json(json.dumps(info))
    else:
        print_inspect(out, info, path)


# ---------------------------------------------------------------- bench, eval
@app.command()
def bench(
    artifact: Annotated[str, typer.Argument(help="artifact folder", show_default=False)],
    json_file: Annotated[Optional[str], typer.Option("--json", metavar="FILE", help="also write the results as JSON")] = None,
    repeats: Annotated[int, typer.Option(help="timed runs per model")] = 20,
    warmup: Annotated[int, typer.Option(help="untimed runs per model first")] = 3,
    threads: Annotated[int, typer.Option(help="onnxruntime intra-op threads")] = 2,
    provider: Annotated[Optional[list[str]], typer.Option(
        "--provider", metavar="NAME",
        help="onnxruntime execution provider: cpu, cuda, tensorrt or a full name like CUDAExecutionProvider "
             "(repeatable or a comma list, in order of preference; default cpu)")] = None,
    allow_cpu_fallback: Annotated[bool, typer.Option(
        "--allow-cpu-fallback", help="run on CPU (with a warning) when a --provider is not available")] = False,
    samples: Annotated[Optional[int], typer.Option(help="samples per length distribution for the baselines (default: a few batches)")] = None,
    no_baselines: Annotated[bool, typer.Option("--no-baselines", help="only the dense export at the same static shapes")] = False,
    genai: Annotated[Optional[str], typer.Option(
        "--genai", metavar="DIR",
        help="language models: also time an onnxruntime-genai build of the same model (the model builder's output "
             "folder: genai_config.json + its decoder ONNX; benchmarks/setup_genai.sh makes one) in the same "
             "interleaved run")] = None,
    long_prompts: Annotated[str, typer.Option(
        "--long-prompts", metavar="LENGTHS",
        help="language models with a KV-cache policy: decode ms/token after prompts of these lengths (comma list; "
             "max = the longest the artifact holds), full cache vs the compiled policy; 'none' skips them")] = "1024,2048,4096,max",
) -> None:
    """time an artifact against dense baselines a user could run instead (same static shapes; dynamic shapes batched
    by length; onnxruntime-fused; fused INT8) on short, paragraph and long real text, interleaved in one run"""
    from compressor.measure.bench import bench_artifact

    err, out = consoles()
    providers = checked_providers(provider, allow_cpu_fallback, err)
    if genai is not None:
        from compressor.measure.genai import check_build

        check_build(genai)  # the folder itself, before the artifact is read (its vocabulary is checked once it is)
    with progress_bars(err, "benchmarking") as bars:
        result = bench_artifact(artifact, repeats=repeats, warmup=warmup, threads=threads, providers=providers,
                                allow_fallback=allow_cpu_fallback, baselines=not no_baselines, samples=samples,
                                progress=bars.step, genai=genai,
                                long_prompts=None if long_prompts == "none" else long_prompts)
    print_bench(out, result, artifact)
    write_json(out, json_file, result)


def checked_providers(names: list[str] | None, allow_fallback: bool, err) -> list[str] | None:
    """The --provider names resolved against this onnxruntime now (one-line refusal before any timing); a fallback
    to CPU is printed as one warning line."""
    from compressor.runtime.providers import resolve_providers

    requested = [n for entry in (names or []) for n in entry.split(",") if n.strip()] or None
    if requested is None:
        return None  # bench's default: CPU
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = resolve_providers(requested, allow_fallback)
    for w in caught:
        err.print(f"warning: {w.message}", markup=False, highlight=False)
    return chosen


@app.command(name="eval")
def eval_(
    artifact: Annotated[str, typer.Argument(help="artifact folder of a language model", show_default=False)],
    perplexity: Annotated[str, typer.Option(metavar="TEXTFILE", help="UTF-8 text, tokenized without special tokens",
                                            show_default=False)],
    windows: Annotated[Optional[int], typer.Option(help="at most this many non-overlapping windows (default: all)")] = None,
    window_len: Annotated[int, typer.Option("--window-len", help="tokens per window")] = 512,
    threads: Annotated[Optional[int], typer.Option(help="onnxruntime intra-op threads")] = None,
    json_file: Annotated[Optional[str], typer.Option("--json", metavar="FILE", help="also write the results as JSON")] = None,
) -> None:
    """language models: perplexity of dense and compressed on a text file"""
    from compressor.measure.bench import eval_perplexity

    err, out = consoles()
    with progress_bars(err, "evaluating") as bars:
        result = eval_perplexity(artifact, perplexity, windows, window_len, threads, progress=bars.step)
    out.print(f"perplexity over {result['windows']} windows of {result['window_len']} tokens of {perplexity}: "
              f"dense {result['perplexity_dense']:.3f}, compressed {result['perplexity_compressed']:.3f} "
              f"({result['ratio']:.2f}x)", markup=False, highlight=False, soft_wrap=True)
    write_json(out, json_file, result)


@app.command()
def report(
    artifacts: Annotated[Optional[list[str]], typer.Argument(help="artifact folders (speed-ups from ART/bench.json)", show_default=False)] = None,
    output: Annotated[str, typer.Option("--output", "-o", metavar="FILE.html", help="the HTML page to write (PNGs beside it)")] = "report.html",
    sweep: Annotated[Optional[list[str]], typer.Option(
        "--sweep", metavar="BENCH.json", help="a benchmark JSON with `rows` to plot too (repeatable)")] = None,
) -> None:
    """one self-contained HTML page: quality against measured speed, per-layer tokens and widths, table, recipes"""
    from compressor.report.html import write_report

    err, out = consoles()
    with err.status("drawing..."):
        summary = write_report(artifacts or [], output, sweep or [])
    out.print(f"wrote {summary['output']} ({len(summary['rows'])} rows, {len(summary['images'])} pictures)", markup=False,
              highlight=False, soft_wrap=True)
    if summary["unmeasured"]:
        out.print(f"speed-up and latency show '-' for {', '.join(summary['unmeasured'])}: no bench.json beside "
                  f"{'it' if len(summary['unmeasured']) == 1 else 'them'}; run `compress bench ART --json "
                  f"ART/bench.json` for each, then this command again", markup=False, highlight=False, soft_wrap=True)


from compressor.cli.sign import register as register_signing  # noqa: E402  (keygen, sign, verify)

register_signing(app)


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Run `compress` with these arguments (sys.argv when None) and return its exit code; errors are one line."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from compressor.runtime.errors import RuntimeUsageError

    command = typer.main.get_command(app)
    _building.clear()
    with terminate_on_signals():  # SIGTERM / SIGHUP unwind like Ctrl-C: temporary folders removed, nothing published
        try:
            code = command.main(args=argv, prog_name="compress", standalone_mode=False)
        except Terminated as e:
            return _error(_stopped(str(e)), e.exit_code)
        except (CompressorError, RuntimeUsageError) as e:
            return _error(str(e), getattr(e, "exit_code", EXIT_FAILURE))
        except typer.Abort:
            return _error("aborted; nothing was published", EXIT_FAILURE)
        except OSError as e:  # disk full, permissions: the user's environment, not a bug
            return _error(f"{e.strerror or e} ({e.filename or ''})", EXIT_FAILURE)
        except Exception as e:
            if not _is_parse_error(e):
                raise
            return _error(f"{' '.join(e.format_message().split())} (see compress {_command_of(argv)}--help)", e.exit_code)
    if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C into this exit code
        return _error(_stopped("interrupted"), EXIT_INTERRUPTED)
    return code if isinstance(code, int) else EXIT_OK


def _stopped(what: str) -> str:
    """A signal's one line: whether the artifact was published before it came (publishing holds signals until both
    renames are done, so it is all or nothing)."""
    from compressor.artifact.lock import was_published

    done = [str(o) for o in _building if was_published(o)]
    return f"{what} after publishing {done[0]}" if done else f"{what}; nothing was published"


def _is_parse_error(e: Exception) -> bool:
    """An unknown option, a missing argument, a value that is not an int: typer raises its (vendored) click's
    exceptions, which are not public, so they are recognised by what they offer."""
    return callable(getattr(e, "format_message", None)) and isinstance(getattr(e, "exit_code", None), int)


def _command_of(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    names = typer.main.get_command(app).commands if args else {}
    return next((f"{a} " for a in args if a in names), "")


def _error(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
