"""Recipe in, artifact out: the one function behind `compress run` (and each attempt of `--budget`), the same
straight line for every kind of model: resolve once, load, check, calibrate, run the passes, compile, publish."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from compressor.artifact.compile import compile_artifact
from compressor.artifact.lock import output_lock
from compressor.artifact.publish import check_output
from compressor.pipeline.pass_manager import Pipeline
from compressor.pipeline.recipe import Recipe, ResolvedRecipe, resolve_recipe
from compressor.program.handle import load
from compressor.sources.data import attach_calibration


def run_recipe(recipe: Recipe, output, *, force: bool = False, instruments=None, progress=None) -> dict:
    """Build and publish; the output's lock is held from before the passes to the end (a second build to the same
    output is refused in one line), and the output is checked under it, before minutes of passes, not after."""
    with output_lock(output):
        check_output(Path(output), force)
        return build(resolve_recipe(recipe), output, force=force, instruments=instruments, progress=progress)


def build(resolved: ResolvedRecipe, output, *, passes: list | Callable | None = None, force: bool = False,
          instruments=None, progress=None, record: dict | None = None) -> dict:
    """One build of a resolved recipe into `output`: its passes, or `passes` (a list, or a function of the loaded
    handle that picks them: the budget search); `record` adds to the manifest's recipe."""
    handle = load(resolved.source, **resolved.shapes)
    chosen = resolved.passes if passes is None else passes(handle) if callable(passes) else passes
    handle.target.check_passes(handle.adapter, chosen)
    attach_calibration(handle, resolved.data)  # every calibrating pass reads [data] calibration through it
    Pipeline(chosen, instruments).run(handle)
    return compile_artifact(handle, output, resolved.validation, force=force, data=resolved.data,
                            recipe={**resolved.to_dict(), **(record or {})}, options=resolved.options,
                            progress=progress)
