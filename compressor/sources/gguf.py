"""GGUF checkpoints as model sources (`--model FILE.gguf`, or a folder holding one .gguf and no config.json).

Transformers dequantises the file once (float32) into a safetensors folder in the cache, keyed by the file's
sha256; the folder records which file it came from, and the manifest's source carries that record.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

from compressor.sources.cache import cache_dir
from compressor.errors import UsageError

RECORD = "gguf_source.json"


def gguf_file(path: Path, spec: str) -> Path | None:
    """The GGUF file behind a source path: the file itself, or the only .gguf in a folder without config.json."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise UsageError(f"'{spec}' holds {len(found)} .gguf files and no config.json; pass one of them as --model FILE.gguf")
    return found[0] if found else None


def converted_folder(path: Path, spec: str) -> Path:
    """The cached transformers folder dequantised from this GGUF file (converted on first use)."""
    from compressor.sources.source import sha256_file

    sha = sha256_file(path)
    dest = cache_dir() / "gguf" / sha[:16]
    if dest.exists():
        _record_path(dest, path)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        _convert(path, tmp / "model", spec)
        (tmp / "model" / RECORD).write_text(json.dumps({"gguf_file": path.name, "gguf_sha256": sha, "gguf_path": str(path.resolve())}, indent=2))
        try:
            (tmp / "model").rename(dest)
        except OSError:
            if not dest.exists():  # another process converted the same file meanwhile: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _convert(path: Path, dest: Path, spec: str) -> None:
    from compressor.sources.examples import convert_gguf

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # transformers' per-tensor progress bar
            convert_gguf(path.parent, path.name, dest)
    except Exception as e:  # transformers raises many types for a GGUF it cannot read
        import transformers

        first = str(e).splitlines()[0] if str(e) else ""
        raise UsageError(f"'{spec}': transformers {transformers.__version__} cannot read this GGUF ({type(e).__name__}: {first})") from None


def conversion_record(folder: Path) -> dict | None:
    """The GGUF file a cached folder was converted from (name and sha256), or None for an ordinary folder.
    (The record also keeps the file's local path for `source_gguf`; manifests carry only name and sha256.)"""
    record = Path(folder) / RECORD
    return {k: v for k, v in json.loads(record.read_text()).items() if k != "gguf_path"} if record.exists() else None


def _record_path(folder: Path, path: Path) -> None:
    """Point an existing conversion's record at this copy of its GGUF when the recorded one is gone (or, for a folder
    converted before paths were recorded, missing): best effort, the conversion itself is unaffected."""
    record = folder / RECORD
    try:
        data = json.loads(record.read_text())
        if data.get("gguf_path") and Path(data["gguf_path"]).is_file():
            return
        data["gguf_path"] = str(path.resolve())
        tmp = record.with_name(f".{RECORD}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(record)
    except (OSError, ValueError):
        pass


def source_gguf(folder: Path) -> Path | None:
    """The GGUF file a converted folder came from, or None (an ordinary folder, or a file since moved or changed).

    A folder converted by `converted_folder` records the file's absolute path; the file is returned while its sha256
    still matches the record (a folder converted before paths were recorded gives None until its GGUF is loaded
    again, which records the path). The GGUF-based examples
    (`example:smollm2`, `example:gemma3-270m`) are recognised by their cache folder; their GGUF is kept in the cache
    (fetched or joined again if it was removed).
    """
    from compressor.sources.examples import GGUF_EXAMPLES, example_gguf

    folder = Path(folder).resolve()
    for name in GGUF_EXAMPLES:
        if folder == (cache_dir() / "models" / name).resolve():
            return example_gguf(name)
    record = folder / RECORD
    record = json.loads(record.read_text()) if record.exists() else None
    if not record or not record.get("gguf_path"):
        return None
    path = Path(record["gguf_path"])
    if not path.is_file():
        return None
    from compressor.sources.source import sha256_file

    return path if sha256_file(path) == record.get("gguf_sha256") else None
