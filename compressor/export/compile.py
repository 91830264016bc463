"""Compile a handle into an artifact: capture, lower to ONNX, validate, write the manifest, publish atomically.

Everything is written into a temporary folder beside the output; only when validation passes is it renamed into
place, so a failed or interrupted build never leaves a half-written artifact.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from pathlib import Path

from compressor.runtime.artifact import FORMAT_NAME, FORMAT_VERSION, MANIFEST, hash_folder
from compressor.runtime.model import make_session

from compressor.program.capture import capture, graph_stats
from compressor.errors import UsageError, ValidationFailed
from compressor.export.onnx import OPSET, OUTPUT_NAME, lower_to_onnx
from compressor.program.handle import load as load_handle
from compressor.export.optimize import check_buckets, deploy_graph, export_options, lowered_path
from compressor.export.validate import validate, validation_config

MODEL_FILE = "model.onnx"
HF_FOLDER = "hf"  # the compressed model as a stock transformers folder, where it is one
SENTENCE_TRANSFORMERS_FILES = ["modules.json", "sentence_bert_config.json", "1_Pooling/config.json"]  # keep its pooling


def versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    from compressor import __version__

    return {"compressor": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__}


def check_output(output: Path, force: bool) -> None:
    if output.exists():
        if not force:
            raise UsageError(f"output '{output}' already exists; choose another folder or pass --force to replace it")
        if output.is_dir() and any(output.iterdir()) and not (output / MANIFEST).exists():
            raise UsageError(f"output '{output}' exists and is not an artifact; refusing to replace it even with --force")


def export_onnx(handle, folder: Path, dense: bool = False, file_name: str = MODEL_FILE):
    """Capture the (dense or compressed) program and lower it into folder/file_name; returns graph stats."""
    example = handle.example_inputs()
    program = capture(handle.program(dense=dense), example)
    stats = graph_stats(program)
    lower_to_onnx(program, example, [s.name for s in handle.input_specs()], folder / file_name)
    return stats


def compile_artifact(handle, output: str | Path, validation=None, *, force: bool = False,
                     data: dict | None = None, recipe: dict | None = None, progress=None, options=None) -> dict:
    """Export, validate and publish the artifact for `handle`; returns the manifest. Raises ValidationFailed (exit 3).

    `validation` is a ValidationConfig / LMValidationConfig or a recipe's raw [validation] table; `options` the
    deployment rewrites (ExportOptions or a raw [export] table; default: the recipe's [export] keys fuse/quantize).
    """
    output = Path(output)
    if handle.adapter.modality == "audio":
        raise UsageError("speech models compile through compressor.export.speech.compile_speech (or `compress run`), "
                         "which exports the encoder, cross keys/values and decoder")
    cfg = validation_config(handle.adapter.modality, validation)
    options = export_options(options if options is not None else (recipe or {}).get("export"))
    check_buckets(options, handle.adapter.modality, handle.shapes.get("seq_len"))
    data = data or {}
    check_output(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    step = progress or (lambda msg: None)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))
    try:
        step("capturing the dense baseline")
        dense = handle.baseline or graph_stats(capture(handle.program(dense=True), handle.example_inputs()))
        for name in handle.adapter.artifact_files():
            shutil.copy2(Path(handle.adapter.folder) / name, tmp / name)
        if handle.adapter.modality == "causal_lm":
            stats, result, deployed = _compile_decoder(handle, tmp, cfg, options, step)
        else:
            step("capturing and lowering to ONNX")
            stats = export_onnx(handle, tmp)
            if stats.params != dense.params and handle.adapter.transformers_loadable:  # structure changed, reloadably
                write_transformers_folder(handle, tmp, step)
            deployed, lowered = deploy_graph(tmp / MODEL_FILE, options, handle.adapter, step)
            step("validating on held-out inputs")
            source = data.get("texts") if handle.adapter.modality == "text" else data.get("images")
            original = load_handle(handle.source.reload_spec, **handle.shapes)
            result = validate(handle, make_session(tmp / MODEL_FILE), cfg, source, original.program(dense=True),
                              make_session(lowered) if lowered else None)
            lowered_path(tmp / MODEL_FILE).unlink(missing_ok=True)
            if options.buckets:
                from compressor.export.buckets import compile_buckets

                deployed["buckets"] = compile_buckets(handle, original, tmp, options, cfg, source, result, step)
        manifest = build_manifest(handle, dense, stats, result, recipe)
        manifest["export"] = deployed
        if deployed.get("lowering", {}).get("lowering") == "fused":
            from compressor.export.decoder_deploy import mark_fused

            mark_fused(manifest, options)
        publish_validated(tmp, manifest, result, output)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _compile_decoder(handle, tmp: Path, cfg, options, step):
    """Language models: one dynamic-shape graph (fused and quantized if asked), a stock transformers folder beside it,
    validation on held-out text (perplexity on the graph that ships; ONNX vs PyTorch on its FP32 graph)."""
    from compressor.runtime.lm import CausalLM

    from compressor.export.onnx import lower_decoder_to_onnx
    from compressor.sources.source import load_source
    from compressor.export.validate_lm import validate_lm

    from compressor.export.decoder_deploy import deploy_fused_decoder, mark_fused
    from compressor.export.lower_decoder import fused_refusal
    from compressor.export.optimize import fused_decoder

    step("capturing the decoder")
    stats = graph_stats(capture(handle.program(), handle.example_inputs()))
    fused = fused_decoder(options)
    refusal = fused_refusal(handle.adapter) if fused else None
    if refusal and options.lowering == "fused":
        raise UsageError(f"[export] lowering = \"fused\": {refusal}; use lowering = \"generic\"")
    fused = fused and refusal is None
    if fused:
        deployed, lowered = deploy_fused_decoder(handle, tmp / MODEL_FILE, options, step)
    else:
        step("lowering the decoder to ONNX (traced)")
        lower_decoder_to_onnx(handle.program(), handle.adapter, tmp / MODEL_FILE)
        deployed, lowered = deploy_graph(tmp / MODEL_FILE, options, handle.adapter, step)
        if refusal:
            deployed["lowering"] = {"lowering": "generic", "why": refusal}
    if handle.adapter.transformers_loadable:
        write_transformers_folder(handle, tmp, step)
    step("validating on held-out text")
    partial = build_manifest(handle, stats, stats, {}, None)
    if fused:
        mark_fused(partial, options)
    lm = CausalLM(tmp, partial)
    before = CausalLM(tmp, dict(partial, model_file=lowered.name)) if lowered else None
    reference, _ = load_source(handle.source.reload_spec)
    result = validate_lm(handle, lm, reference, cfg, before)
    if lowered:
        del before
        lowered.unlink(missing_ok=True)
        lowered.with_name(lowered.name + ".data").unlink(missing_ok=True)  # a graph over 1 GB keeps its weights beside it
    return stats, result, deployed


def write_transformers_folder(handle, tmp: Path, step) -> None:
    """The compressed model as a stock transformers folder (hf/), with the files its pre-processing reads."""
    step("writing the transformers folder")
    handle.adapter.model.save_pretrained(str(tmp / HF_FOLDER), safe_serialization=True)
    folder = Path(handle.adapter.folder)
    for name in handle.adapter.artifact_files() + [n for n in SENTENCE_TRANSFORMERS_FILES if (folder / n).exists()]:
        (tmp / HF_FOLDER / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(folder / name, tmp / HF_FOLDER / name)


def publish_validated(folder: Path, manifest: dict, result: dict, output: Path) -> None:
    """Hash every file into the manifest, write it, and publish the folder only if validation passed (exit 3 and
    nothing published otherwise)."""
    manifest["files"] = hash_folder(folder)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if not result["passed"]:
        raise ValidationFailed("validation failed, nothing published: " + "; ".join(result["failures"]))
    publish(folder, output)


def publish(tmp: Path, output: Path) -> None:
    """Rename the finished folder into place; an existing artifact is moved aside first and removed after."""
    published_modes(tmp)
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{_dt.datetime.now().strftime('%H%M%S%f')}")
        output.rename(old)
    tmp.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def published_modes(folder: Path) -> None:
    """mkdtemp makes the folder 0700 and copies keep their source's modes: give every folder and file the modes a
    plain mkdir / open would (0755 and 0644 under the usual umask), so the artifact can be shared once published."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def build_manifest(handle, dense, stats, validation_result: dict, recipe: dict | None) -> dict:
    specs = handle.input_specs()
    hidden = handle.adapter.config.hidden_size
    if handle.adapter.modality == "causal_lm":
        from compressor.export.onnx import decoder_io_names

        ad = handle.adapter
        outputs = [{"name": "logits", "shape": ["batch", "sequence", ad.config.vocab_size], "dtype": "float32"}]
        kv = [h for h in ad.kv_heads for _ in range(2)]
        outputs += [{"name": n, "shape": ["batch", kv[i], "total", ad.head_dim], "dtype": "float32"}
                    for i, n in enumerate(decoder_io_names(len(ad.layers))[1][1:])]
    else:
        width = getattr(handle.adapter, "output_size", hidden)  # e.g. CLIP's projection
        outputs = [{"name": OUTPUT_NAME, "shape": [handle.shapes["batch"], width], "dtype": "float32"}]
    return {
        "format": {"name": FORMAT_NAME, "version": FORMAT_VERSION},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": handle.source.to_json(),
        "model": handle.adapter.describe(),
        "model_file": MODEL_FILE,
        "opset": OPSET,
        "shapes": handle.shapes,
        "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in specs],
        "outputs": outputs,
        "preprocess": handle.adapter.preprocess_config(handle.shapes),
        "passes": handle.history,
        "token_plan": {
            "merges": handle.plan.merges or [0] * handle.num_layers,
            "proportional_attention": handle.plan.proportional_attention,
            **handle.plan.describe(),
            "token_counts": handle.plan.token_counts(handle.num_tokens, handle.num_layers),
        },
        "flops": {"dense": dense.flops, "compressed": stats.flops, "ratio": dense.flops / max(stats.flops, 1)},
        "params": {"dense": dense.params, "compressed": stats.params},
        "validation": validation_result,
        "recipe": recipe,
        "versions": versions(),
    }
