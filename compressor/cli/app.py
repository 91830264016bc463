"""The `compress` command: a thin layer over the Python API.

Exit codes: 0 success, 1 failure, 2 usage or input error, 3 validation failed (no artifact published).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from compressor.errors import EXIT_FAILURE, EXIT_OK, CompressorError, UsageError


def _console():
    from rich.console import Console

    return Console(stderr=True), Console()


def _fmt_flops(v: float) -> str:
    return f"{v / 1e9:.2f} G"


def _fmt_params(v: float) -> str:
    return f"{v / 1e6:.2f} M"


# ---------------------------------------------------------------- run
def cmd_run(args) -> int:
    from compressor.pipeline.recipe import Recipe, load_recipe, parse_pass_spec

    if args.recipe:
        recipe = load_recipe(args.recipe)
        if args.model:
            recipe.source = args.model
        if args.passes:
            recipe.passes = [parse_pass_spec(s) for s in args.passes]
    elif args.model:
        recipe = Recipe(args.model, [parse_pass_spec(s) for s in (args.passes or [])])
    else:
        raise UsageError("give a recipe file or --model PATH (with --pass NAME:key=value ...)")
    for key in ("batch", "seq_len", "image_size"):
        value = getattr(args, key)
        if value is not None:
            recipe.export[key] = value
    if args.samples is not None:
        recipe.validation["samples"] = args.samples
    err, out = _console()
    if args.dry_run:
        from compressor.pipeline.recipe import resolve_recipe

        out.print(resolve_recipe(recipe).to_toml(), markup=False, highlight=False)
        return EXIT_OK
    if not args.output:
        raise UsageError("--output DIR is required (where the artifact is written)")
    from compressor.pipeline.build import run_recipe

    with err.status("loading model...") as status:
        manifest = run_recipe(recipe, args.output, force=args.force, instruments=[_PassPrinter(err)],
                              progress=lambda msg: status.update(f"{msg}..."))
    _print_summary(out, manifest, args.output)
    return EXIT_OK


class _PassPrinter:
    def __init__(self, console):
        self.console = console

    def before_pass(self, p, index, total):
        self.console.print(f"pass {index + 1}/{total}: {p!r}")

    def after_pass(self, p, record):
        info = record["info"]
        if "token_counts" in info:
            self.console.print(f"  schedule (tokens merged per layer): {info['schedule']}")
            self.console.print(f"  tokens per layer: {info['token_counts']}")
        if "boundary_widths" in info:
            self.console.print(f"  residual widths per boundary ({info['width_schedule']}): {info['boundary_widths']}")
        ratio = record["flops_before"] / max(record["flops_after"], 1)
        self.console.print(f"  {record['seconds'] * 1000:.1f} ms, FLOPs {_fmt_flops(record['flops_before'])} -> "
                         f"{_fmt_flops(record['flops_after'])} ({ratio:.2f}x), probe cosine {record['probe']['cosine_to_previous_mean']:.4f}")


def _print_summary(out, manifest: dict, output) -> None:
    from rich.table import Table

    v = manifest["validation"]
    t = Table(title=f"artifact {output}")
    t.add_column("metric")
    t.add_column("dense", justify="right")
    t.add_column("compressed", justify="right")
    t.add_row("FLOPs", _fmt_flops(manifest["flops"]["dense"]), _fmt_flops(manifest["flops"]["compressed"]))
    t.add_row("params", _fmt_params(manifest["params"]["dense"]), _fmt_params(manifest["params"]["compressed"]))
    if "perplexity_onnx" in v:
        t.add_row(f"perplexity ({v['windows']} held-out windows)", f"{v['perplexity_dense_torch']:.3f}", f"{v['perplexity_onnx']:.3f}")
        out.print(t)
        out.print(f"FLOPs ratio {manifest['flops']['ratio']:.2f}x; ONNX vs PyTorch perplexity gap {v['onnx_gap']:.1e}; "
                  f"greedy agreement {v['greedy_agreement']:.2f}")
        return
    counts = manifest["token_plan"]["token_counts"]
    t.add_row("tokens in -> out", f"{counts[0]} -> {counts[0]}", f"{counts[0]} -> {counts[-1]}")
    out.print(t)
    out.print(f"FLOPs ratio {manifest['flops']['ratio']:.2f}x; validation on {v['samples']} held-out samples: "
              f"cosine to dense mean {v['cosine_to_dense_mean']:.4f}, p5 {v['cosine_to_dense_p5']:.4f}; "
              f"ONNX/PyTorch agreement {v['onnx_vs_torch_agreement']:.3f}")


# ---------------------------------------------------------------- passes
def cmd_passes(args) -> int:
    from rich.table import Table

    import compressor.passes  # noqa: F401

    from compressor.pipeline.pass_base import REGISTRY, option_table

    _, out = _console()
    for name, cls in sorted(REGISTRY.items()):
        t = Table(title=f"{name}: {cls.summary}", title_justify="left")
        for col in ("option", "type", "default", "meaning"):
            t.add_column(col)
        for row in option_table(cls):
            t.add_row(*row)
        out.print(t)
        out.print(f"  requires: {sorted(cls.requires)}  ensures: {sorted(cls.ensures)}")
    return EXIT_OK


# ---------------------------------------------------------------- models
# example checkpoints of families whose adapters name none (`examples` on an adapter class wins)
EXAMPLE_CHECKPOINTS = {"dinov2": ("example:dinov2-small", "facebook/dinov2-small"),
                       "llama": ("example:smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct")}


def model_families() -> list[dict]:
    """One row per supported family: its model types, modality, the passes that apply and example checkpoints."""
    import compressor.passes  # noqa: F401  (registers the bundled passes)
    from compressor.models import ADAPTERS

    rows: dict[str, dict] = {}
    for cls in ADAPTERS:
        row = rows.setdefault(cls.family, {"family": cls.family, "model_types": [], "modality": cls.modality,
                                           "passes": _applicable_passes(cls), "examples": []})
        row["model_types"] += [t for t in cls.model_types if t not in row["model_types"]]
        for e in getattr(cls, "examples", None) or EXAMPLE_CHECKPOINTS.get(cls.family, ()):
            if e not in row["examples"]:
                row["examples"].append(e)
    return list(rows.values())


def _applicable_passes(adapter_cls) -> list[str]:
    """Passes whose `requires` the family's capabilities meet (as a handle computes them, plus what applicable passes
    ensure), less those whose own check refuses the family on a stand-in that has the class's attributes only."""
    from compressor.program.handle import ModelHandle
    from compressor.pipeline.pass_base import REGISTRY

    handle = ModelHandle(adapter_cls.__new__(adapter_cls), source=None, shapes={})
    caps, applies = set(handle.capabilities), []
    grew = True
    while grew:
        grew = False
        for name, cls in sorted(REGISTRY.items()):
            if name in applies or not cls.requires <= caps or _refuses(cls, handle):
                continue
            applies.append(name)
            caps |= cls.ensures
            grew = True
    return sorted(applies)


def _refuses(pass_cls, handle) -> bool:
    stand_in = pass_cls.__new__(pass_cls)
    stand_in.config = None  # options are not the question here: some passes have no valid default
    try:
        stand_in.check(handle)
    except UsageError:
        return True
    except Exception:  # the check needs a loaded model: `requires` decides
        return False
    return False


def cmd_models(args) -> int:
    from rich.table import Table

    rows = model_families()
    _, out = _console()
    if args.json:
        out.print_json(json.dumps(rows))
        return EXIT_OK
    t = Table(title="supported model families (config.json model_type)", title_justify="left")
    for col in ("family", "model types", "modality", "passes", "example checkpoints"):
        t.add_column(col, overflow="fold")  # never cut a name short in a narrow terminal
    for r in rows:
        t.add_row(r["family"], ", ".join(r["model_types"]), r["modality"], ", ".join(r["passes"]), "\n".join(r["examples"]))
    out.print(t)
    return EXIT_OK


# ---------------------------------------------------------------- inspect
def cmd_inspect(args) -> int:
    from rich.table import Table

    from compressor.cli.inspect_model import inspect_path

    err, out = _console()
    with err.status("inspecting..."):
        info = inspect_path(args.path)
    if args.json:
        out.print_json(json.dumps(info))
        return EXIT_OK
    t = Table(title=f"{info['kind']}: {args.path}", show_header=False)
    m = info["model"]
    t.add_row("family", f"{m['family']} ({m['modality']})")
    t.add_row("architecture", f"{m['layers']} layers, width {m['hidden_size']}, {m['heads']} heads")
    shown = info["inputs"][:2] if len(info["inputs"]) > 4 else info["inputs"]
    more = f", and {len(info['inputs']) - 2} past key/value inputs" if len(info["inputs"]) > 4 else ""
    t.add_row("inputs", ", ".join(f"{i['name']} {i['shape']} {i['dtype']}" for i in shown) + more)
    if info["kind"] == "artifact":
        t.add_row("source", info["source"])
        t.add_row("passes", "; ".join(f"{p['name']} {p['options']}" for p in info["passes"]) or "none")
        t.add_row("FLOPs", f"{_fmt_flops(info['flops']['dense'])} dense -> {_fmt_flops(info['flops']['compressed'])} ({info['flops']['ratio']:.2f}x)")
        t.add_row("params", f"{_fmt_params(info['params']['dense'])} -> {_fmt_params(info['params']['compressed'])}")
        val = info["validation"]
        if "perplexity_onnx" in val:
            t.add_row("validation", f"passed={val['passed']} perplexity {val['perplexity_dense_torch']:.3f} dense -> "
                      f"{val['perplexity_onnx']:.3f} ONNX, gap to PyTorch {val['onnx_gap']:.1e}, greedy agreement {val['greedy_agreement']:.2f}")
        else:
            t.add_row("validation", f"passed={val['passed']} cosine mean {val['cosine_to_dense_mean']:.4f} p5 "
                      f"{val['cosine_to_dense_p5']:.4f} agreement {val['onnx_vs_torch_agreement']:.3f}")
    else:
        t.add_row("params", _fmt_params(info["params"]))
        t.add_row("FLOPs", f"{_fmt_flops(info['flops'])} at {info['shapes']}")
    if m["modality"] != "causal_lm":
        t.add_row("tokens per layer", " -> ".join(str(c) for c in info["token_counts"]))
    out.print(t)
    return EXIT_OK


# ---------------------------------------------------------------- bench
def cmd_bench(args) -> int:
    from rich.table import Table

    from compressor.export.bench import bench_artifact

    err, out = _console()
    with err.status("benchmarking...") as status:
        result = bench_artifact(args.artifact, repeats=args.repeats, warmup=args.warmup, threads=args.threads,
                                progress=lambda msg: status.update(f"{msg}..."))
    if "decode_speedup" in result:
        t = Table(title=f"{args.artifact}: onnxruntime CPU, {result['threads']} threads")
        for col in ("model", f"prefill {result['prefill_tokens']} (ms)", f"decode {result['decode_tokens']} (ms)", "params (M)"):
            t.add_column(col, justify="right")
        t.add_row("dense", f"{result['dense_ms']:.1f}", f"{result['decode_dense_ms']:.1f}", f"{result['params_dense'] / 1e6:.1f}")
        t.add_row("compressed", f"{result['compressed_ms']:.1f}", f"{result['decode_compressed_ms']:.1f}", f"{result['params_compressed'] / 1e6:.1f}")
        t.add_row("speed-up", f"{result['speedup']:.2f}x", f"{result['decode_speedup']:.2f}x", "")
    else:
        t = Table(title=f"{args.artifact}: onnxruntime CPU, {result['threads']} threads, median of {result['repeats']}")
        for col in ("model", "latency (ms)", "GFLOPs", "speed-up", "FLOPs ratio", "efficiency"):
            t.add_column(col, justify="right")
        t.add_row("dense", f"{result['dense_ms']:.2f}", f"{result['dense_flops'] / 1e9:.2f}", "1.00", "1.00", "")
        t.add_row("compressed", f"{result['compressed_ms']:.2f}", f"{result['compressed_flops'] / 1e9:.2f}",
                  f"{result['speedup']:.2f}", f"{result['flops_ratio']:.2f}", f"{result['efficiency']:.2f}")
    out.print(t)
    _write_json(out, args.json, result)
    return EXIT_OK


def _write_json(out, path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2))
        out.print(f"wrote {path}")


# ---------------------------------------------------------------- eval
def cmd_eval(args) -> int:
    from compressor.export.bench import eval_perplexity

    err, out = _console()
    with err.status("evaluating...") as status:
        result = eval_perplexity(args.artifact, args.perplexity, args.windows, args.window_len, args.threads,
                                 progress=lambda msg: status.update(f"{msg}..."))
    out.print(f"perplexity over {result['windows']} windows of {result['window_len']} tokens of {args.perplexity}: "
              f"dense {result['perplexity_dense']:.3f}, compressed {result['perplexity_compressed']:.3f} "
              f"({result['ratio']:.2f}x)")
    _write_json(out, args.json, result)
    return EXIT_OK


# ---------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compress", description="Ahead-of-time compression compiler for transformers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="compile a model with a recipe (or --model/--pass) into a verified artifact",
                         description="Compile a model into a validated ONNX artifact. Exit 3 if validation fails (nothing is published).")
    run.add_argument("recipe", nargs="?", help="recipe TOML file (see examples/)")
    run.add_argument("--output", "-o", help="artifact folder to write")
    run.add_argument("--model", help="model source: a Hugging Face folder or example:minilm / example:dinov2-small (overrides the recipe)")
    run.add_argument("--pass", dest="passes", action="append", metavar="NAME:K=V,...", help="a pass with options, e.g. token_merge:r=8 (repeatable; replaces the recipe's passes)")
    run.add_argument("--batch", type=int, help="compiled batch size")
    run.add_argument("--seq-len", dest="seq_len", type=int, help="compiled sequence length (text)")
    run.add_argument("--image-size", dest="image_size", type=int, help="compiled square image size (vision)")
    run.add_argument("--samples", type=int, help="held-out validation samples")
    run.add_argument("--dry-run", action="store_true", help="print the fully resolved recipe and exit")
    run.add_argument("--force", action="store_true", help="replace an existing artifact at --output")
    run.set_defaults(func=cmd_run)

    ps = sub.add_parser("passes", help="list registered passes with their options and defaults")
    ps.set_defaults(func=cmd_passes)

    md = sub.add_parser("models", help="list supported model families: model types, modality, passes that apply, example checkpoints")
    md.add_argument("--json", action="store_true", help="print JSON instead of a table")
    md.set_defaults(func=cmd_models)

    ins = sub.add_parser("inspect", help="show a model folder, example or artifact: architecture, params, FLOPs, tokens per layer")
    ins.add_argument("path", help="model folder, example:NAME, or artifact folder")
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ins.set_defaults(func=cmd_inspect)

    b = sub.add_parser("bench", help="time an artifact against the dense export of its source (same shapes, one run)")
    b.add_argument("artifact", help="artifact folder")
    b.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    b.add_argument("--repeats", type=int, default=20, help="timed runs per model (default 20)")
    b.add_argument("--warmup", type=int, default=3, help="untimed runs per model first (default 3)")
    b.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    b.set_defaults(func=cmd_bench)

    e = sub.add_parser("eval", help="language models: perplexity of dense and compressed on a text file")
    e.add_argument("artifact", help="artifact folder of a language model")
    e.add_argument("--perplexity", required=True, metavar="TEXTFILE", help="UTF-8 text, tokenized without special tokens")
    e.add_argument("--windows", type=int, help="at most this many non-overlapping windows (default: all)")
    e.add_argument("--window-len", dest="window_len", type=int, default=512, help="tokens per window (default 512)")
    e.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    e.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    e.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    from compressor.runtime.errors import FeedError, RuntimeArtifactError

    try:
        return args.func(args)
    except (CompressorError, RuntimeArtifactError, FeedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", EXIT_FAILURE)
    except KeyboardInterrupt:
        print("error: interrupted; nothing was published", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permissions: the user's environment, not a bug
        print(f"error: {e.strerror or e} ({e.filename or ''})", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
