"""Recipe in, artifact out: the one function behind `compress run`."""

from __future__ import annotations

from pathlib import Path

from compressor.export.compile import check_output, compile_artifact
from compressor.program.handle import load
from compressor.pipeline.pass_manager import Pipeline
from compressor.pipeline.recipe import Recipe, resolve_recipe


def run_recipe(recipe: Recipe, output, *, force: bool = False, instruments=None, progress=None) -> dict:
    check_output(Path(output), force)  # before minutes of passes, not after
    resolve_recipe(recipe)  # the manifest records every default that was filled in
    handle = load(recipe.source, **recipe.export)
    if handle.adapter.modality == "audio":
        from compressor.export.speech import compile_speech_handle

        return compile_speech_handle(handle, recipe, output, instruments=instruments, progress=progress)
    Pipeline(recipe.passes, instruments).run(handle)
    return compile_artifact(handle, output, recipe.validation, force=force, data=recipe.data,
                            recipe=recipe.to_dict(), progress=progress)
