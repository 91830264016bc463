"""Publishing: the output checked before any work, every file hashed into the manifest, and the finished folder
renamed into place only when validation passed (either the old artifact or the new one is at the output, never
neither)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from compressor.artifact.lock import note_published, old_path, signals_deferred
from compressor.errors import UsageError, ValidationFailed
from compressor.runtime.artifact import FORMAT_NAME, MANIFEST, hash_folder, read_manifest
from compressor.runtime.errors import RuntimeArtifactError
from compressor.validation.bars import failure_message


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


def publish_validated(folder: Path, manifest: dict, result: dict, output: Path, relax: dict | None = None) -> None:
    """Hash every file into the manifest, write it, and publish the folder only if validation passed (exit 3 and
    nothing published otherwise)."""
    manifest["files"] = hash_folder(folder)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if not result["passed"]:
        raise ValidationFailed(failure_message(result, relax))
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
