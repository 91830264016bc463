"""The artifact's fixed names and the one way to read its manifest's bytes: shared by the loader and the
signature check, which must read exactly the bytes the loader then parses."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import RuntimeArtifactError

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
UNLISTED = (MANIFEST, SIGNATURE)  # at the folder's top: the manifest cannot hash itself, nor the signature over it
MAX_MANIFEST_BYTES = 16 << 20  # real manifests are tens of kilobytes
REBUILD = "rebuild the artifact"


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def read_manifest_bytes(folder) -> bytes:
    """The exact bytes of the artifact's manifest.json (what a signature covers), from a regular file in the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RuntimeArtifactError(f"artifact '{folder}' does not exist or is not a folder")
    path = folder / MANIFEST
    if not os.path.lexists(path):
        raise RuntimeArtifactError(f"'{folder}' is not a compressor artifact: no {MANIFEST}")
    if not _inside(os.path.realpath(folder), os.path.realpath(path)):
        raise RuntimeArtifactError(f"{path} is a symbolic link out of the artifact folder; {REBUILD}")
    if not path.is_file():
        raise RuntimeArtifactError(f"{path} is not a regular file; {REBUILD}")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise RuntimeArtifactError(f"{path} is {size} bytes, far more than any manifest; the artifact is damaged, {REBUILD}")
    return path.read_bytes()
