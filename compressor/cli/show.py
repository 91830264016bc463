"""What the `compress` commands print: rich tables on stdout, progress on stderr."""

from __future__ import annotations

import json
from pathlib import Path


def consoles():
    """(stderr, stdout) rich consoles, made at call time so captured streams (tests) are honoured."""
    from rich.console import Console

    return Console(stderr=True), Console()


def fmt_flops(v: float) -> str:
    return f"{v / 1e9:.2f} G"


def fmt_params(v: float) -> str:
    return f"{v / 1e6:.2f} M"


class PassPrinter:
    """A pass-manager instrument: one line before each pass, its schedule and cost after."""

    def __init__(self, console, bars=None):
        self.console, self.bars = console, bars

    def before_pass(self, p, index, total):
        self.console.print(f"pass {index + 1}/{total}: {p!r}")
        if self.bars is not None:
            self.bars.step(f"pass {index + 1}/{total}: {p.name}")

    def after_pass(self, p, record):
        info = record["info"]
        if "token_counts" in info:
            self.console.print(f"  schedule (tokens merged per layer): {info['schedule']}")
            self.console.print(f"  tokens per layer: {info['token_counts']}")
        if "boundary_widths" in info:
            self.console.print(f"  residual widths per boundary ({info['width_schedule']}): {info['boundary_widths']}")
        ratio = record["flops_before"] / max(record["flops_after"], 1)
        self.console.print(f"  {record['seconds'] * 1000:.1f} ms, FLOPs {fmt_flops(record['flops_before'])} -> "
                           f"{fmt_flops(record['flops_after'])} ({ratio:.2f}x), probe cosine {record['probe']['cosine_to_previous_mean']:.4f}")


def print_summary(out, manifest: dict, output) -> None:
    from rich.table import Table

    v = manifest["validation"]
    t = Table(title=f"artifact {output}")
    t.add_column("metric")
    t.add_column("dense", justify="right")
    t.add_column("compressed", justify="right")
    t.add_row("FLOPs", fmt_flops(manifest["flops"]["dense"]), fmt_flops(manifest["flops"]["compressed"]))
    t.add_row("params", fmt_params(manifest["params"]["dense"]), fmt_params(manifest["params"]["compressed"]))
    if "perplexity_onnx" in v:
        t.add_row(f"perplexity ({v['windows']} held-out windows)", f"{v['perplexity_dense_torch']:.3f}", f"{v['perplexity_onnx']:.3f}")
        out.print(t)
        out.print(f"FLOPs ratio {manifest['flops']['ratio']:.2f}x; ONNX vs PyTorch perplexity gap {v['onnx_gap']:.1e}; "
                  f"greedy agreement {v['greedy_agreement']:.2f}")
        return
    counts = manifest["token_plan"]["token_counts"]
    if "wer_compressed" in v:  # speech
        t.add_row("audio tokens out of the encoder", str(counts[0]), str(counts[-1]))
        t.add_row(f"WER ({v['clips']} synthesised clips)", f"{v['wer_dense']:.3f}", f"{v['wer_compressed']:.3f}")
        out.print(t)
        out.print(f"encoder FLOPs ratio {manifest['flops']['ratio']:.2f}x; WER vs dense transcripts {v['wer_compressed_vs_dense']:.3f}; "
                  f"ONNX/PyTorch transcript agreement {v['export_agreement']:.2f}")
        return
    t.add_row("tokens in -> out", f"{counts[0]} -> {counts[0]}", f"{counts[0]} -> {counts[-1]}")
    out.print(t)
    out.print(f"FLOPs ratio {manifest['flops']['ratio']:.2f}x; validation on {v['samples']} held-out samples: "
              f"cosine to dense mean {v['cosine_to_dense_mean']:.4f}, p5 {v['cosine_to_dense_p5']:.4f}; "
              f"ONNX/PyTorch agreement {v['onnx_vs_torch_agreement']:.3f}")


def print_passes(out) -> None:
    from rich.table import Table

    import compressor.passes  # noqa: F401  (registers the bundled passes)
    from compressor.pipeline.pass_base import option_table
    from compressor.pipeline.registry import REGISTRY

    for name, cls in sorted(REGISTRY.items()):
        t = Table(title=f"{name}: {cls.summary}", title_justify="left")
        for col in ("option", "type", "default", "meaning"):
            t.add_column(col)
        for row in option_table(cls):
            t.add_row(*row)
        out.print(t)
        out.print(f"  requires: {sorted(cls.requires)}  ensures: {sorted(cls.ensures)}")


def print_models(out, rows: list[dict]) -> None:
    from rich.table import Table

    t = Table(title="supported model families (config.json model_type)", title_justify="left")
    for col in ("family", "model types", "modality", "passes", "example checkpoints"):
        t.add_column(col, overflow="fold")  # never cut a name short in a narrow terminal
    for r in rows:
        t.add_row(r["family"], ", ".join(r["model_types"]), r["modality"], ", ".join(r["passes"]), "\n".join(r["examples"]))
    out.print(t)


def _stat(record: dict, key: str, spec: str = ".3f") -> str:
    """A validation number formatted, or '?' where the record lacks it (an artifact from another version)."""
    v = record.get(key)
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else "?"


def signature_row(path: str) -> str:
    """What `compress inspect` says of an artifact's signature (checking it needs the public key: compress verify)."""
    from compressor.runtime.signing import is_signed

    if is_signed(path):
        return f"signed (manifest.sig, Ed25519; check it with: compress verify {path} --key KEY.pub)"
    return f"unsigned (sign it with: compress sign {path} --key KEY)"


def print_inspect(out, info: dict, path: str) -> None:
    from rich.table import Table

    t = Table(title=f"{info['kind']}: {path}", show_header=False)
    m = info["model"]
    t.add_row("family", f"{m['family']} ({m['modality']})")
    t.add_row("architecture", f"{m['layers']} layers, width {m['hidden_size']}, {m['heads']} heads")
    past = [i for i in info["inputs"] if i["name"].startswith("past_key_values.")]
    shown = [i for i in info["inputs"] if i not in past] if len(past) > 2 else info["inputs"]
    more = f", and {len(past)} past key/value inputs" if len(past) > 2 else ""
    t.add_row("inputs", ", ".join(f"{i['name']} {i['shape']} {i['dtype']}" for i in shown) + more)
    if info["kind"] == "artifact":
        t.add_row("source", info["source"])
        t.add_row("passes", "; ".join(f"{p['name']} {p['options']}" for p in info["passes"]) or "none")
        t.add_row("FLOPs", f"{fmt_flops(info['flops']['dense'])} dense -> {fmt_flops(info['flops']['compressed'])} ({info['flops']['ratio']:.2f}x)")
        t.add_row("params", f"{fmt_params(info['params']['dense'])} -> {fmt_params(info['params']['compressed'])}")
        val = info["validation"]
        if "wer_compressed" in val:  # speech
            t.add_row("validation", f"passed={val.get('passed')} WER {_stat(val, 'wer_dense')} dense -> "
                      f"{_stat(val, 'wer_compressed')} on {val.get('clips', '?')} synthesised clips, ONNX/PyTorch "
                      f"agreement {_stat(val, 'export_agreement', '.2f')}")
        elif "perplexity_onnx" in val:
            t.add_row("validation", f"passed={val.get('passed')} perplexity {_stat(val, 'perplexity_dense_torch')} dense -> "
                      f"{_stat(val, 'perplexity_onnx')} ONNX, gap to PyTorch {_stat(val, 'onnx_gap', '.1e')}, greedy "
                      f"agreement {_stat(val, 'greedy_agreement', '.2f')}")
        else:
            t.add_row("validation", f"passed={val.get('passed')} cosine mean {_stat(val, 'cosine_to_dense_mean', '.4f')} p5 "
                      f"{_stat(val, 'cosine_to_dense_p5', '.4f')} agreement {_stat(val, 'onnx_vs_torch_agreement')}")
        checked = val.get("kv_policy")
        if checked:
            t.add_row("KV validation", f"{checked['prompts']} held-out prompt(s) of {checked['prompt_tokens']} tokens, "
                      f"next {checked['continuation_tokens']}: perplexity {checked['perplexity_ratio']:.3f}x the full "
                      f"cache's, argmax agreement {checked['teacher_forced_agreement']:.2f} (teacher forced)")
        kv = info.get("kv_cache")
        if kv:
            t.add_row("KV cache", "full (every token kept)" + (f", up to {kv['max_length']} positions" if kv["max_length"] else "")
                      if kv["policy"] == "full" else
                      f"{kv['policy']}: {kv['budget']} slots per layer and head ({kv['sinks']} sinks"
                      + (f", {kv['recent']} recent" if "recent" in kv else "") + f"), {kv['prefill']} prefill, "
                      f"up to {kv['max_length']} positions")
        t.add_row("signature", signature_row(path))
    else:
        t.add_row("params", fmt_params(info["params"]))
        t.add_row("FLOPs", f"{fmt_flops(info['flops'])} at {info['shapes']}")
    from compressor.targets import target_for

    if not target_for(m["modality"]).decoder:
        t.add_row("tokens per layer", " -> ".join(str(c) for c in info["token_counts"]))
    out.print(t)


def print_bench(out, result: dict, artifact: str) -> None:
    from rich.table import Table

    where = f"onnxruntime {', '.join(result.get('providers') or ['CPUExecutionProvider'])}, {result['threads']} threads"
    if "decode_speedup" in result:
        t = Table(title=f"{artifact}: {where}")
        for col in ("model", f"prefill {result['prefill_tokens']} (ms)", f"decode {result['decode_tokens']} (ms)", "params (M)"):
            t.add_column(col, justify="right")
        t.add_row("dense", f"{result['dense_ms']:.1f}", f"{result['decode_dense_ms']:.1f}", f"{result['params_dense'] / 1e6:.1f}")
        for name, b in result.get("baselines", {}).items():
            if name != "dense":
                t.add_row(_baseline_label(name, b), f"{b['prefill_ms']:.1f}", f"{b['decode_ms']:.1f}", "")
        t.add_row("compressed", f"{result['compressed_ms']:.1f}", f"{result['decode_compressed_ms']:.1f}", f"{result['params_compressed'] / 1e6:.1f}")
        t.add_row("speed-up", f"{result['speedup']:.2f}x", f"{result['decode_speedup']:.2f}x", "")
        for name, b in result.get("baselines", {}).items():
            if name != "dense":
                t.add_row(f"speed-up vs {_baseline_label(name, b)}", f"{b['prefill_speedup']:.2f}x", f"{b['decode_speedup']:.2f}x", "")
    else:
        t = Table(title=f"{artifact}: {where}, median of {result['repeats']}")
        for col in ("model", "latency (ms)", "GFLOPs", "speed-up", "FLOPs ratio", "efficiency"):
            t.add_column(col, justify="right")
        t.add_row("dense", f"{result['dense_ms']:.2f}", f"{result['dense_flops'] / 1e9:.2f}", "1.00", "1.00", "")
        t.add_row("compressed", f"{result['compressed_ms']:.2f}", f"{result['compressed_flops'] / 1e9:.2f}",
                  f"{result['speedup']:.2f}", f"{result['flops_ratio']:.2f}", f"{result['efficiency']:.2f}")
    out.print(t)
    if result.get("long_prompt"):
        t = Table(title="long prompts: decode ms/token, full cache vs the compiled KV policy (same graph and weights)")
        for col in ("prompt", "prefill (s)", "full cache", "policy", "speed-up", "KV MB full -> policy"):
            t.add_column(col, justify="right")
        for r in result["long_prompt"]:
            t.add_row(str(r["prompt"]), f"{r['prefill_s']:.1f}", f"{r['full_ms']:.1f}", f"{r['policy_ms']:.1f}",
                      f"{r['speedup']:.2f}x", f"{r['full_kv_mb']:.0f} -> {r['policy_kv_mb']:.0f}")
        out.print(t)
    if result.get("genai"):
        g = result["genai"]
        note = f"genai: {g['build']} (model type {g['model_type']})"
        if g.get("generator_skipped"):
            note += f"; no og.Generator row: {g['generator_skipped']}"
        out.print(note, markup=False, highlight=False, soft_wrap=True)
    if result.get("distributions"):
        from compressor.measure.baseline_bench import BASELINE_COLUMNS, baseline_rows

        b = Table(title="speed-up of the artifact over each dense baseline, by real length distribution (above 1: faster)")
        for col in BASELINE_COLUMNS:
            b.add_column(col, justify="right")
        for row in baseline_rows(result):
            b.add_row(*row)
        out.print(b)


def _baseline_label(name: str, row: dict) -> str:
    """A decoder baseline's row label: our dense exports read 'dense fused ...'; an onnxruntime-genai build is not our
    export, so it keeps its own name."""
    return name.replace("_", " ") if row.get("kind") == "onnxruntime-genai" else f"dense {name.replace('_', ' ')}"


def write_json(out, path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2))
        out.print(f"wrote {path}")
