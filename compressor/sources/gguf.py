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
    from compressor.runtime.artifact import sha256_of

    check_gguf(path, spec)
    sha = sha256_of(path)
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


READABLE_VERSIONS = (2, 3)  # what gguf-py's reader (and so transformers) reads


def check_gguf(path: Path, spec: str) -> None:
    """Refuse, in one line, a file that is not a GGUF, a GGUF version the reader does not know, or a truncated GGUF:
    the header's tensor table gives each tensor's offset and byte size, so a whole file is at least data start +
    max(offset + size) bytes. Read with our own header parser (~0.3 s for Gemma 3's 262k vocabulary)."""
    import struct

    from compressor.sources.gguf_codes import _Header
    from compressor.sources.checkpoint import what_file_is

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    if not head.startswith(b"GGUF"):
        raise UsageError(f"'{spec}': cannot read this GGUF: it is {what_file_is(head, size)}, not a GGUF "
                         "(no GGUF magic at its start); pass a .gguf checkpoint")
    if size < 24:
        raise UsageError(f"'{spec}': cannot read this GGUF: it is truncated ({size} bytes, less than the 24-byte "
                         "GGUF preamble); download or copy it again")
    version = int.from_bytes(head[4:8], "little")
    if version & 0xFFFF == 0:  # a big-endian file (gguf-py reads it byte-swapped): not checked further here
        return
    if version not in READABLE_VERSIONS:
        raise UsageError(f"'{spec}': cannot read this GGUF: it is GGUF version {version}, the reader knows versions "
                         f"{' and '.join(map(str, READABLE_VERSIONS))}; convert the model again with a current "
                         "llama.cpp (convert_hf_to_gguf.py)")
    try:
        header = _Header(path)
        whole = header.pos <= size
    except (struct.error, ValueError, IndexError, OverflowError, MemoryError, UnicodeError):
        whole = False
    if not whole:
        raise UsageError(f"'{spec}': cannot read this GGUF: it is truncated or damaged inside its header (the "
                         f"metadata and tensor table do not fit in its {size:,} bytes); download or copy it again")
    try:
        need = header.data_end()
    except (KeyError, ValueError) as e:
        raise UsageError(f"'{spec}': cannot read this GGUF: it holds a tensor type the installed gguf package does "
                         f"not know ({e}); convert it to a common type (Q8_0, Q4_K_M) with llama.cpp") from None
    if size < need:
        raise UsageError(f"'{spec}': cannot read this GGUF: it is truncated: the file has {size:,} bytes but its "
                         f"tensor table needs {need:,} ({need - size:,} missing); download or copy it again")


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
    from compressor.runtime.artifact import sha256_of

    return path if sha256_of(path) == record.get("gguf_sha256") else None


def gguf_for(folder) -> Path | None:
    """The GGUF file behind a model folder (a converted user GGUF or a GGUF-based example), or None."""
    return source_gguf(Path(folder))
