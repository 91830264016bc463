"""Compile a handle into an artifact: the target lowers, validates and writes; this checks the request first and
publishes atomically.

Everything is written into a temporary folder beside the output; only when validation passes is it renamed into
place, so a failed or interrupted build never leaves a half-written artifact.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from compressor.artifact.lock import output_lock
from compressor.artifact.publish import check_output, publish_validated
from compressor.lower.optimize import export_options

HF_FOLDER = "hf"  # the compressed model as a stock transformers folder, where it is one
SENTENCE_TRANSFORMERS_FILES = ["modules.json", "sentence_bert_config.json", "1_Pooling/config.json"]  # keep its pooling


def compile_artifact(handle, output: str | Path, validation=None, *, force: bool = False,
                     data: dict | None = None, recipe: dict | None = None, progress=None, options=None) -> dict:
    """Export, validate and publish the artifact for `handle`; returns the manifest. Raises ValidationFailed (exit 3).

    `validation` is the target's validation config or a recipe's raw [validation] table; `options` the deployment
    rewrites (ExportOptions or a raw [export] table; default: the recipe's [export] keys fuse/quantize/...).
    """
    output, target = Path(output), handle.target
    cfg = target.validation_config(validation)
    options = export_options(options if options is not None else (recipe or {}).get("export"))
    target.check_export(options, handle.shapes)
    with output_lock(output):  # reentrant: `compress run` and run_recipe took it before the passes
        check_output(output, force)
        tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))
        try:
            manifest, result, relax = target.write(handle, tmp, cfg, options, data or {}, recipe,
                                                   progress or (lambda msg: None))
            publish_validated(tmp, manifest, result, output, relax)
            return manifest
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def write_transformers_folder(handle, tmp: Path, step) -> None:
    """The compressed model as a stock transformers folder (hf/), with the files its pre-processing reads."""
    step("writing the transformers folder")
    handle.adapter.model.save_pretrained(str(tmp / HF_FOLDER), safe_serialization=True)
    folder = Path(handle.adapter.folder)
    for name in handle.adapter.artifact_files() + [n for n in SENTENCE_TRANSFORMERS_FILES if (folder / n).exists()]:
        (tmp / HF_FOLDER / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(folder / name, tmp / HF_FOLDER / name)
