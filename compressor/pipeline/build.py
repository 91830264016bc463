"""Recipe in, artifact out: the one function behind `compress run`."""

from __future__ import annotations

from pathlib import Path

from compressor.export.compile import check_output, compile_artifact
from compressor.export.publish_lock import output_lock
from compressor.program.handle import load
from compressor.sources.data import attach_calibration
from compressor.pipeline.pass_manager import Pipeline
from compressor.pipeline.recipe import Recipe, resolve_recipe


def run_recipe(recipe: Recipe, output, *, force: bool = False, instruments=None, progress=None) -> dict:
    """Build and publish; the output's lock is held from before the passes to the end (a second build to the same
    output is refused in one line), and the output is checked under it, before minutes of passes, not after."""
    with output_lock(output):
        check_output(Path(output), force)
        resolve_recipe(recipe)  # the manifest records every default that was filled in
        handle = load(recipe.source, **recipe.export)
        attach_calibration(handle, recipe.data)  # every calibrating pass reads [data] calibration through it
        if handle.adapter.modality == "audio":
            from compressor.export.speech import compile_speech_handle

            return compile_speech_handle(handle, recipe, output, instruments=instruments, progress=progress)
        Pipeline(recipe.passes, instruments).run(handle)
        return compile_artifact(handle, output, recipe.validation, force=force, data=recipe.data,
                                recipe=recipe.to_dict(), progress=progress)
