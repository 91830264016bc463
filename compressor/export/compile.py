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

from compressor.runtime.artifact import FORMAT_NAME, FORMAT_VERSION, MANIFEST, hash_folder, read_manifest
from compressor.runtime.errors import RuntimeArtifactError
from compressor.runtime.model import make_session

from compressor.program.capture import capture, graph_stats
from compressor.errors import UsageError, ValidationFailed
from compressor.export.onnx import OPSET, OUTPUT_NAME, lower_to_onnx
from compressor.program.handle import load as load_handle
from compressor.export.optimize import check_buckets, deploy_graph, export_options, lowered_path
from compressor.export.publish_lock import note_published, old_path, output_lock, signals_deferred
from compressor.export.validate import failure_message, validate, validation_config

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
    """The output is free, or `force` and it is an artifact to replace: a folder whose manifest.json is a compressor
    manifest (an empty folder too). A regular file, a link, or a folder of anything else is never replaced."""
    if not (output.exists() or output.is_symlink()):
        return
    if not force:
        raise UsageError(f"output '{output}' already exists; choose another folder or pass --force to replace it")
    if output.is_symlink() or not output.is_dir():
        kind = "a symbolic link" if output.is_symlink() else "a file, not an artifact folder"
        raise UsageError(f"output '{output}' is {kind}; --force replaces only an artifact folder, choose another --output")
    if any(output.iterdir()) and not is_artifact(output):
        raise UsageError(f"output '{output}' exists and is not an artifact (no valid {MANIFEST}); refusing to replace "
                         f"it even with --force, choose another --output")


def is_artifact(folder: Path) -> bool:
    """A folder holding a compressor manifest (read without checking the file hashes; any format version, so that an
    artifact of an older compressor can be rebuilt in place)."""
    try:
        read_manifest(folder, verify=False)
        return True
    except RuntimeArtifactError:
        try:  # only a version mismatch is left to accept: the format name is ours
            fmt = json.loads((folder / MANIFEST).read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            return False
        return isinstance(fmt, dict) and fmt.get("name") == FORMAT_NAME


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
    with output_lock(output):  # reentrant: `compress run` and run_recipe took it before the passes
        check_output(output, force)
        return _compile_locked(handle, output, cfg, options, data, recipe, progress or (lambda msg: None))


def _compile_locked(handle, output: Path, cfg, options, data: dict, recipe: dict | None, step) -> dict:
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
        raise ValidationFailed(failure_message(result))
    publish(folder, output)


def publish(tmp: Path, output: Path) -> None:
    """Rename the finished folder into place; an existing artifact is moved aside first and removed after. Signals
    wait until both renames are done, and if the second fails the old artifact goes back: either the old artifact or
    the new one is at `output`, never neither."""
    published_modes(tmp)
    old = None
    try:
        with signals_deferred():  # a signal held here is delivered at the end of the block, after both renames
            if output.exists() or output.is_symlink():
                old = old_path(output)
                output.rename(old)
            try:
                tmp.rename(output)
            except BaseException:
                if old is not None:
                    old.rename(output)
                    old = None
                raise
            note_published(output)
    finally:
        if old is not None:  # the replaced artifact, also when a held signal is now ending the run
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
    model = handle.adapter.describe()
    model["params"] = stats.params  # counted as params.compressed is (weights and constants the graph reads)
    return {
        "format": {"name": FORMAT_NAME, "version": FORMAT_VERSION},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": handle.source.to_json(),
        "model": model,
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
