"""`compress bench`: an artifact against the dense model, same run.

Top-level fields: the dense export at the artifact's own static shapes, on one held-out batch (runs interleaved:
dense, compressed, compressed, dense, ...; medians compared, so machine noise hits both sides alike). `distributions`
(unless baselines=False): against what a user would run instead (dense with dynamic shapes batched by length, and
fused by onnxruntime's optimizer, FP32 and INT8) on short, paragraph and long real texts: see baseline_bench.py.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from compressor.runtime.artifact import read_manifest
from compressor.runtime.model import make_session

from compressor.measure.baselines import dense_export
from compressor.measure.timing import time_interleaved

from compressor.errors import UsageError
from compressor.targets import target_of


def held_out_batch(path: Path, manifest: dict) -> dict:
    """One compiled batch of held-out samples, pre-processed by the artifact's own stored config (no model load)."""
    from compressor.runtime.preprocess import ImagePreprocessor, TextPreprocessor

    from compressor.sources import data

    pre, shapes = manifest["preprocess"], manifest["shapes"]
    if target_of(manifest).text:
        return TextPreprocessor(path / pre["tokenizer"], shapes["seq_len"], pre["pad_id"])(data.text_split("validation", shapes["batch"]))
    images = data.image_split("validation", shapes["batch"])
    return ImagePreprocessor(pre["size"], pre["mean"], pre["std"], pre.get("resample", "bicubic"))(images)


def bench_artifact(path: str | Path, repeats: int = 20, warmup: int = 3, threads: int = 2, progress=None,
                   providers=None, allow_fallback: bool = False, baselines: bool = True, samples: int | None = None,
                   genai: str | Path | None = None, long_prompts: str | None = "1024,2048,4096,max") -> dict:
    """The artifact against the dense export at the same static shapes (top-level fields, one held-out batch) and,
    with `baselines`, against what a user would run instead, per length distribution (see baseline_table). `genai`:
    an onnxruntime-genai build folder of the same language model, timed as one more row (genai_baseline.py)."""
    if repeats < 1 or warmup < 0 or threads < 1:
        raise UsageError("bench needs repeats >= 1, warmup >= 0 and threads >= 1")
    if samples is not None and samples < 1:
        raise UsageError("bench needs samples >= 1")
    step = progress or (lambda msg: None)
    path = Path(path)
    manifest = read_manifest(path, verify=True)
    build = None
    if genai is not None:
        from compressor.measure.genai import check_build, vocab_of

        if not target_of(manifest).decoder:
            raise UsageError(f"--genai compares language models, and '{path}' is a {manifest['preprocess']['kind']} "
                             "artifact; drop --genai, or bench a causal-LM artifact")
        build = check_build(genai, vocab_of(manifest))
    if target_of(manifest).speech:
        raise UsageError("compress bench does not time speech artifacts yet; benchmarks/whisper.py measures Whisper's "
                         "encoder speed-up and word error rate")
    lengths = None
    if long_prompts and manifest["preprocess"].get("kv_policy"):  # checked now, not after minutes of timing
        from compressor.measure.long_prompt import STEPS, parse_lengths

        lengths = parse_lengths(long_prompts, int(manifest["preprocess"]["max_length"]), STEPS)
    open_session = lambda p: make_session(p, providers, threads, allow_fallback)  # noqa: E731
    step("exporting the dense baseline (cached after the first time)")
    dense_path = dense_export(manifest)
    if target_of(manifest).decoder:
        result = bench_decoder(path, manifest, dense_path, repeats, warmup, threads, step, providers, allow_fallback,
                               baselines, genai=build)
        if lengths:
            from compressor.measure.long_prompt import long_prompt_rows
            from compressor.runtime.lm import CausalLM

            lm = CausalLM(path, manifest, threads=threads, providers=providers, allow_fallback=allow_fallback)
            result["long_prompt"] = long_prompt_rows(lm, lengths, step=step)
        return result
    feeds = held_out_batch(path, manifest)
    sessions = {"dense": open_session(dense_path), "compressed": open_session(path / manifest["model_file"])}
    step(f"timing {repeats} interleaved runs per model")
    times = time_interleaved(sessions, feeds, repeats, warmup)
    dense_ms, comp_ms = statistics.median(times["dense"]), statistics.median(times["compressed"])
    speedup = dense_ms / comp_ms
    flops_ratio = manifest["flops"]["ratio"]
    result = {
        "artifact": str(path),
        "source": manifest["source"]["spec"],
        "shapes": manifest["shapes"],
        "threads": threads,
        "providers": sessions["compressed"].get_providers(),
        "repeats": repeats,
        "dense_ms": dense_ms,
        "compressed_ms": comp_ms,
        "dense_ms_min": min(times["dense"]),
        "compressed_ms_min": min(times["compressed"]),
        "speedup": speedup,
        "flops_ratio": flops_ratio,
        "efficiency": speedup / flops_ratio,
        "dense_flops": manifest["flops"]["dense"],
        "compressed_flops": manifest["flops"]["compressed"],
        "token_counts": manifest["token_plan"]["token_counts"],
        "graph": manifest.get("export", {}).get("steps", []),
    }
    if baselines:
        from compressor.measure.baseline_bench import baseline_table

        result["distributions"] = baseline_table(path, manifest, open_session, repeats, warmup,
                                                 samples or 2 * manifest["shapes"]["batch"], step)
        result["load_average"] = list(os.getloadavg())
    return result


def bench_decoder(path: Path, manifest: dict, dense_path: Path, repeats: int, warmup: int, threads: int, step,
                  providers=None, allow_fallback: bool = False, baselines: bool = True,
                  prefill_len: int = 512, decode_tokens: int = 64, context: int = 128, genai=None) -> dict:
    """Prefill of 1 x prefill_len tokens, and decode_tokens greedy steps after a context: the artifact against the
    dense export (top-level fields) and, with `baselines`, against that export fused by onnxruntime's optimizer,
    in FP32 and INT8 (`baselines`), and with `genai` (a checked GenaiBuild) against that onnxruntime-genai build,
    all timed interleaved in one run."""
    from compressor.runtime.lm import CausalLM

    from compressor.measure.baselines import dense_decoder_fused
    from compressor.sources.lm_data import held_out_windows

    on = dict(threads=threads, providers=providers, allow_fallback=allow_fallback)
    dense_files = {"dense": (dense_path, {})}
    if baselines:
        step("fusing the dense decoder (cached after the first time)")
        dense_files["fused"] = dense_decoder_fused(manifest, dense_path)
        dense_files["fused_int8"] = dense_decoder_fused(manifest, dense_path, int8=True)
    models = {n: CausalLM(p.parent, dict(manifest, model_file=p.name, **_dense_decoder_layout(p, manifest)), **on)
              for n, (p, _) in dense_files.items()}
    models["compressed"] = CausalLM(path, manifest, **on)
    genai_rows, genai_record = {}, None
    if genai is not None:
        from compressor.measure.genai import genai_rows as open_genai

        step(f"opening the onnxruntime-genai build {genai.folder}")
        genai_rows, genai_record = open_genai(genai, lambda p: make_session(p, providers, threads, allow_fallback),
                                              threads, models["compressed"].session.get_providers())
    tokenizer = path / manifest["preprocess"]["tokenizer"]
    window = held_out_windows(tokenizer, prefill_len, 1)[0]
    prefill = {n: _Call(lambda m=m: m.logits(window)) for n, m in models.items()}
    ids, context_ids = window.tolist(), window[:context].tolist()
    prefill.update({n: _Call(lambda r=r: r.prefill(ids)) for n, (r, _) in genai_rows.items()})
    step(f"timing prefill of {prefill_len} tokens, {repeats} interleaved runs")
    t_prefill = {n: statistics.median(t) for n, t in time_interleaved(prefill, {}, repeats, warmup).items()}
    decode = {n: _Call(lambda m=m: list(m.stream(window[:context].tolist(), decode_tokens, stop_on_eos=False)))
              for n, m in models.items()}
    decode.update({n: _Call(lambda r=r: r.stream(context_ids, decode_tokens)) for n, (r, _) in genai_rows.items()})
    step(f"timing {decode_tokens} decode steps after {context} tokens")
    t_decode = {n: statistics.median(t) for n, t in time_interleaved(decode, {}, max(3, repeats // 4), min(warmup, 1)).items()}
    pd, pc, dd, dc = t_prefill["dense"], t_prefill["compressed"], t_decode["dense"], t_decode["compressed"]
    result = {
        "artifact": str(path), "source": manifest["source"]["spec"], "threads": threads, "repeats": repeats,
        "dense_ms": pd, "compressed_ms": pc, "speedup": pd / pc,
        "prefill_tokens": prefill_len,
        "decode_tokens": decode_tokens, "decode_context": context,
        "decode_dense_ms": dd, "decode_compressed_ms": dc, "decode_speedup": dd / dc,
        "flops_ratio": manifest["flops"]["ratio"], "efficiency": (pd / pc) / manifest["flops"]["ratio"],
        "dense_flops": manifest["flops"]["dense"], "compressed_flops": manifest["flops"]["compressed"],
        "params_dense": manifest["params"]["dense"], "params_compressed": manifest["params"]["compressed"],
        "graph": manifest.get("export", {}).get("steps", []),
    }
    rows = {n: about for n, (_, about) in dense_files.items()} if baselines else {}
    rows.update({n: about for n, (_, about) in genai_rows.items()})
    if rows:
        result["baselines"] = {
            n: {"prefill_ms": t_prefill[n], "prefill_speedup": t_prefill[n] / pc,
                "decode_ms": t_decode[n], "decode_speedup": t_decode[n] / dc, **about}
            for n, about in rows.items()}
        result["load_average"] = list(os.getloadavg())
    if baselines:
        result["baselines_note"] = ("decoders: our dense dynamic-shape export (`dense`), it after onnxruntime's "
                                    "transformer optimizer (`fused`), and that in INT8 dynamic per channel (`fused_int8`)")
    if genai_record is not None:
        result["genai"] = genai_record
    return result


def _dense_decoder_layout(dense_path: Path, manifest: dict) -> dict:
    """The dense decoder's inputs, outputs and cache layout, read from its graph: pruning may have removed blocks or
    key/value heads from the artifact, so its manifest does not describe the dense model's cache."""
    import onnx

    graph = onnx.load(str(dense_path), load_external_data=False).graph

    def spec(v):
        dtype = "int64" if v.type.tensor_type.elem_type == onnx.TensorProto.INT64 else "float32"
        return {"name": v.name, "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim], "dtype": dtype}

    inputs = [spec(v) for v in graph.input]
    kv = [i["shape"][1] for i in inputs if i["name"].startswith("past_key_values.") and i["name"].endswith(".key")]
    return {"inputs": inputs, "outputs": [spec(v) for v in graph.output],
            "preprocess": dict(manifest["preprocess"], num_layers=len(kv), kv_heads=kv, kv_cache=None)}  # traced layout


class _Call:
    """Adapts a zero-argument callable to the session-like .run(None, feeds) that time_interleaved calls."""

    def __init__(self, fn):
        self.fn = fn

    def run(self, _outputs, _feeds):
        return self.fn()


def eval_perplexity(path: str | Path, text_file: str | Path, windows: int | None = None, window_len: int = 512,
                    threads: int | None = None, progress=None) -> dict:
    """Perplexity of the dense and the compressed ONNX models on a text file (no special tokens)."""
    from compressor.runtime.lm import CausalLM

    from compressor.sources.data import read_text_file
    from compressor.sources.lm_data import perplexity_windows, tokenize_plain

    step = progress or (lambda msg: None)
    path = Path(path)
    manifest = read_manifest(path, verify=True)
    if not target_of(manifest).decoder:
        raise UsageError("eval --perplexity needs a language-model artifact")
    if window_len < 2 or (windows is not None and windows < 1):
        raise UsageError("eval needs window_len >= 2 and windows >= 1")
    ids = tokenize_plain(path / manifest["preprocess"]["tokenizer"], ["\n".join(read_text_file(text_file))])
    chunks = perplexity_windows(ids, window_len, windows)
    if len(chunks) == 0:
        raise UsageError(f"'{text_file}' holds {len(ids)} tokens: fewer than one window of {window_len}; lower --window-len")
    step("exporting the dense baseline (cached after the first time)")
    dense_path = dense_export(manifest)
    dense = CausalLM(dense_path.parent, dict(manifest, model_file=dense_path.name), threads=threads)
    compressed = CausalLM(path, manifest, threads=threads)
    step(f"perplexity over {len(chunks)} windows of {window_len} tokens")
    pd, pc = dense.perplexity(chunks), compressed.perplexity(chunks)
    return {"artifact": str(path), "text": str(text_file), "windows": int(len(chunks)), "window_len": window_len,
            "perplexity_dense": pd, "perplexity_compressed": pc, "ratio": pc / pd}
