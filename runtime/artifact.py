"""The artifact's manifest: format version, file hashes, verification. Shared by the compiler and the runtime."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import RuntimeArtifactError

FORMAT_NAME = "compressor-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def hash_folder(folder: Path) -> dict[str, str]:
    """SHA-256 of every file in the folder except the manifest itself, keyed by relative POSIX path."""
    return {
        p.relative_to(folder).as_posix(): sha256_of(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def read_manifest(folder: str | Path, verify: bool = True) -> dict:
    """Read and check an artifact's manifest; with `verify`, every listed file must exist and match its hash."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RuntimeArtifactError(f"artifact '{folder}' does not exist or is not a folder")
    path = folder / MANIFEST
    if not path.is_file():
        raise RuntimeArtifactError(f"'{folder}' is not a compressor artifact: no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RuntimeArtifactError(f"{path} is not valid JSON ({e}); the artifact is damaged, rebuild it") from None
    fmt = manifest.get("format", {})
    if fmt.get("name") != FORMAT_NAME:
        raise RuntimeArtifactError(f"{path} is not a compressor manifest")
    if fmt.get("version") != FORMAT_VERSION:
        raise RuntimeArtifactError(
            f"artifact format version {fmt.get('version')} is not supported by this runtime (expects {FORMAT_VERSION}); "
            "rebuild the artifact or upgrade the runtime"
        )
    if verify:
        files = manifest.get("files", {})
        if not files:
            raise RuntimeArtifactError(f"{path} lists no files")
        for name, digest in files.items():
            f = folder / name
            if not f.is_file():
                raise RuntimeArtifactError(f"artifact file '{name}' is missing from {folder}; rebuild the artifact")
            if sha256_of(f) != digest:
                raise RuntimeArtifactError(
                    f"artifact file '{name}' does not match its SHA-256 in the manifest (tampered or truncated); rebuild the artifact"
                )
    return manifest
