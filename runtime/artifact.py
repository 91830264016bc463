"""The artifact's manifest: format, schema, file hashes, confinement. Shared by the compiler and the runtime.

An artifact is a folder a build server ships to devices, and the loader is the strict part:
- manifest.json is a JSON object of the shape `check_manifest` spells out; each violation is one RuntimeArtifactError
  line naming the key and what was expected;
- every name in it (`files`, `model_file`, bucket graphs, tokenizer, speech graphs, mel filters) is a plain relative
  POSIX path: not absolute, no '..' or '.', no empty part, no backslash, no drive letter;
- every file the runtime opens goes through `member` (graphs through `graph`): listed in `files`, resolving (symbolic
  links followed) to a regular file inside the folder, matching its SHA-256 before use;
- every file in the folder is listed, except manifest.json and manifest.sig at its top (`check_folder`), and no
  symbolic link in it points out of it: onnxruntime opens a graph's external data by the location written in the
  graph, so an unlisted file could otherwise be read unchecked;
- the external-data locations a graph names are read from the graph itself (`external_data`, without the onnx
  package) and must be listed members too: onnxruntime releases before late 2025 do not refuse a location that leaves
  the model's folder.
manifest.sig (signing.py) is an optional Ed25519 signature over the exact bytes of manifest.json.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import stat
from pathlib import Path

from .errors import RuntimeArtifactError
from .files import MANIFEST, MAX_MANIFEST_BYTES, REBUILD, SIGNATURE, UNLISTED, _inside, read_manifest_bytes  # noqa: F401

FORMAT_NAME = "compressor-artifact"
FORMAT_VERSION = 1
KINDS = ("text", "image", "causal_lm", "speech")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_DRIVE = re.compile(r"[A-Za-z]:")
_MISSING = object()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def hash_folder(folder: Path) -> dict[str, str]:
    """SHA-256 of every file in the folder except manifest.json and manifest.sig at its top, keyed by relative POSIX
    path: exactly the files `check_folder` requires a manifest to list."""
    folder = Path(folder)
    return {
        name: sha256_of(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and (name := p.relative_to(folder).as_posix()) not in UNLISTED
    }


# ---------------------------------------------------------------- names and members
def _show(value) -> str:
    """A value for a one-line message: its JSON-ish type and a short repr."""
    if value is _MISSING:
        return "nothing"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def check_name(name, key: str, where: str = MANIFEST) -> str:
    """`name` if it is a plain relative POSIX path inside the artifact, else one line naming the manifest key."""
    if not isinstance(name, str) or not name:
        raise RuntimeArtifactError(f"{where}: {key} must be a file name relative to the artifact folder, "
                                   f"got {_show(name)}; {REBUILD}")
    if ("\\" in name or "\x00" in name or name.startswith("/") or _DRIVE.match(name)
            or any(part in ("", ".", "..") for part in name.split("/"))):
        raise RuntimeArtifactError(f"{where}: {key} {name!r} is not a plain relative path inside the artifact folder "
                                   f"(it is absolute, or has '..', '.', an empty part or a backslash); {REBUILD}")
    return name




_HASHED: dict[str, tuple] = {}  # real path -> (stat key, SHA-256): a file is hashed again only if it changed
_SCANNED: dict[str, tuple] = {}  # real path -> (stat key, external-data locations)


def _stat_key(st) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _cached(cache: dict, path: str, st, compute):
    key = _stat_key(st)
    hit = cache.get(path)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = compute()
    if len(cache) > 4096:
        cache.clear()
    cache[path] = (key, value)
    return value


def member(folder, manifest: dict, name, key: str = "file") -> Path:
    """The verified absolute path of the manifest-relative `name` (`key` names where the manifest gives it, for
    messages): a plain relative path, listed in `files`, resolving (symbolic links followed) to a regular file inside
    the folder, whose SHA-256 matches. Everything the runtime opens comes through here. A file hashed before and
    unchanged since (same inode, size, modification and change times) is not hashed again."""
    check_name(name, key)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or name not in files:
        raise RuntimeArtifactError(f"{MANIFEST}: {key} '{name}' is not listed in 'files', so its SHA-256 cannot be "
                                   f"checked; {REBUILD}")
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, name))
    if not _inside(root, path):
        raise RuntimeArtifactError(f"artifact file '{name}' leads out of the artifact folder (to {path}) through a "
                                   f"symbolic link; an artifact holds its own files: {REBUILD}")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise RuntimeArtifactError(f"artifact file '{name}' is missing from {folder}; {REBUILD}") from None
    if not stat.S_ISREG(st.st_mode):
        raise RuntimeArtifactError(f"artifact file '{name}' is not a regular file; {REBUILD}")
    if _cached(_HASHED, path, st, lambda: sha256_of(Path(path))) != files[name]:
        raise RuntimeArtifactError(f"artifact file '{name}' does not match its SHA-256 in the manifest "
                                   f"(tampered or truncated); {REBUILD}")
    return Path(path)


def graph(folder, manifest: dict, name, key: str = "model_file") -> Path:
    """`member` for an ONNX graph, whose external-data files (onnxruntime opens them by the location the graph names,
    relative to the graph's folder) must be verified members too."""
    path = member(folder, manifest, name, key)
    base = name.rpartition("/")[0]
    for location in sorted(_cached(_SCANNED, str(path), os.stat(path), lambda: external_data(path, name))):
        what = f"the external data of graph '{name}'"
        check_name(location, what)
        member(folder, manifest, f"{base}/{location}" if base else location, what)
    return path


def check_folder(folder, files: dict) -> None:
    """Every file in the folder is listed in `files` (but manifest.json and manifest.sig at its top), none is a device
    or pipe, and no symbolic link in it points out of it. Symbolic links to folders are not followed."""
    root = os.path.realpath(folder)

    def unreadable(error: OSError):
        raise RuntimeArtifactError(f"cannot read '{error.filename}' in the artifact: {error.strerror}")

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        for entry in dirnames + filenames:
            full = os.path.join(dirpath, entry)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            mode = os.lstat(full).st_mode
            if stat.S_ISLNK(mode):
                target = os.path.realpath(full)
                if not _inside(root, target):
                    raise RuntimeArtifactError(f"'{rel}' in artifact {folder} is a symbolic link out of the folder "
                                               f"(to {target}); an artifact holds its own files: {REBUILD}")
                if os.path.isdir(full):
                    continue  # its files are walked where they really are
            elif stat.S_ISDIR(mode):
                continue
            elif not stat.S_ISREG(mode):
                raise RuntimeArtifactError(f"'{rel}' in artifact {folder} is not a regular file (a device, pipe or "
                                           f"socket); remove it")
            if rel not in files and rel not in UNLISTED:
                raise RuntimeArtifactError(f"'{rel}' is in artifact {folder} but not listed in {MANIFEST} 'files' "
                                           f"(a graph could read it unchecked); remove it or {REBUILD}")


def verify_files(folder, manifest: dict) -> None:
    """The folder holds exactly the listed files (`check_folder`), each a verified `member`."""
    check_folder(folder, manifest["files"])
    for name in manifest["files"]:
        member(folder, manifest, name, "a name in 'files'")


# ---------------------------------------------------------------- ONNX external data, without the onnx package
# onnx.proto field numbers: message -> {length-delimited field: the message it holds}
_MODEL, _TRAINING, _GRAPH, _FUNCTION, _NODE, _ATTRIBUTE, _SPARSE, _TENSOR, _ENTRY = range(9)
_NESTED = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},  # graph, training_info, functions
    _TRAINING: {1: _GRAPH, 2: _GRAPH},  # initialization, algorithm
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},  # node, initializer, sparse_initializer
    _FUNCTION: {7: _NODE},  # node
    _NODE: {5: _ATTRIBUTE},  # attribute
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},  # t, g, tensors, graphs, sparse
    _SPARSE: {1: _TENSOR, 2: _TENSOR},  # values, indices
    _TENSOR: {13: _ENTRY},  # external_data (key/value entries)
}


def _varint(buf, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf, i: int, end: int):
    """(field number, start, end) of each length-delimited field of the message in buf[i:end]; others skipped."""
    while i < end:
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > end:
                raise ValueError("field runs past its message")
            yield key >> 3, i, i + n
            i += n
        else:
            raise ValueError(f"wire type {wire}")
    if i != end:
        raise ValueError("message runs past its end")


def external_data(path, name: str = "") -> set[str]:
    """Every external-data location the ONNX graph at `path` names: in initializers, sparse initializers, tensors of
    node attributes, subgraphs, functions and training graphs; read from the protobuf wire format."""
    locations = set()
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return locations
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                stack = [(_MODEL, 0, len(buf))]
                while stack:
                    kind, start, end = stack.pop()
                    if kind == _ENTRY:
                        entry = {field: buf[a:b] for field, a, b in _fields(buf, start, end)}
                        if entry.get(1) == b"location":
                            locations.add(entry.get(2, b"").decode("utf-8", "replace"))
                        continue
                    nested = _NESTED[kind]
                    stack.extend((nested[field], a, b) for field, a, b in _fields(buf, start, end) if field in nested)
            except (ValueError, IndexError):
                raise RuntimeArtifactError(f"graph '{name or path}' is not a readable ONNX file; {REBUILD}") from None
    return locations


# ---------------------------------------------------------------- the manifest's schema
def _int(v, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _ints(v, low: int = 0) -> bool:
    return isinstance(v, list) and all(_int(x, low) for x in v)


def _text(v) -> bool:
    return isinstance(v, str) and v != ""


def _dtype(v) -> bool:
    import numpy as np

    try:
        return isinstance(v, str) and np.dtype(v).kind in "biuf" and np.dtype(v).name == v
    except TypeError:
        return False


class _Schema:
    def __init__(self, where: str):
        self.where = where

    def fail(self, key: str, expected: str, value=_MISSING):
        raise RuntimeArtifactError(f"{self.where}: '{key}' must be {expected}, got {_show(value)}; {REBUILD}")

    def get(self, obj: dict, key: str, path: str, expected: str, ok, optional: bool = False):
        """obj[key] if `ok` says it is what is expected; absent is None where optional (a JSON null too)."""
        value = obj.get(key, _MISSING)
        if optional and (value is _MISSING or value is None):
            return None
        if value is _MISSING or not ok(value):
            self.fail(path, expected, value)
        return value

    def obj(self, obj: dict, key: str, path: str, optional: bool = False):
        return self.get(obj, key, path, "an object", lambda v: isinstance(v, dict), optional)

    def listed(self, value, key: str, files: dict) -> str:
        if value is _MISSING:
            self.fail(key, "a file name listed in 'files'")
        check_name(value, key, self.where)
        if value not in files:
            raise RuntimeArtifactError(f"{self.where}: {key} '{value}' is not listed in 'files', so its SHA-256 "
                                       f"cannot be checked; {REBUILD}")
        return value


def _specs(s: _Schema, manifest: dict, key: str) -> dict:
    """inputs / outputs: a non-empty list of {name, shape, dtype}; returns them by name."""
    specs = manifest.get(key, _MISSING)
    if not isinstance(specs, list) or not specs:
        s.fail(key, "a non-empty list of {name, shape, dtype} objects", specs)
    out = {}
    for i, spec in enumerate(specs):
        where = f"{key}[{i}]"
        if not isinstance(spec, dict):
            s.fail(where, "an object with name, shape and dtype", spec)
        name = s.get(spec, "name", f"{where}.name", "a non-empty string", _text)
        s.get(spec, "shape", f"{where}.shape", "a non-empty list of dimensions (ints >= 0 or names)",
              lambda v: isinstance(v, list) and v and all(_int(d) or _text(d) for d in v))
        s.get(spec, "dtype", f"{where}.dtype", "a numeric numpy dtype name such as 'float32' or 'int64'", _dtype)
        if name in out:
            s.fail(f"{where}.name", f"unique, and '{name}' comes twice")
        out[name] = spec
    return out


def _require(s: _Schema, key: str, specs: dict, names: list[str], what: str) -> None:
    missing = [n for n in names if n not in specs]
    if missing:
        raise RuntimeArtifactError(f"{s.where}: '{key}' must include '{missing[0]}' ({what}); {REBUILD}")


def _static(s: _Schema, key: str, spec: dict) -> None:
    if not all(_int(d, 1) for d in spec["shape"]):
        s.fail(f"{key}.shape", "static (ints >= 1) for an encoder compiled at fixed shapes", spec["shape"])


def check_manifest(manifest, where: str = MANIFEST, complete: bool = False) -> dict:
    """`manifest` if it has the shape the runtime relies on, else one RuntimeArtifactError line naming the key and
    what it must be. `complete` also checks the descriptive keys the `compress` commands read (source, model, passes,
    token_plan, flops, params, validation), which a published artifact always has."""
    if not isinstance(manifest, dict):
        kind = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(manifest), "null")
        raise RuntimeArtifactError(f"{where} must hold a JSON object, got a JSON {kind}; {REBUILD}")
    fmt = manifest.get("format")
    if not isinstance(fmt, dict) or fmt.get("name") != FORMAT_NAME:
        raise RuntimeArtifactError(f"{where} is not a compressor manifest "
                                   f"('format' must be {{\"name\": \"{FORMAT_NAME}\", \"version\": {FORMAT_VERSION}}})")
    version = fmt.get("version")
    if not _int(version) or version != FORMAT_VERSION:
        raise RuntimeArtifactError(
            f"artifact format version {version!r} is not supported by this runtime (expects {FORMAT_VERSION}); "
            "rebuild the artifact or upgrade the runtime"
        )
    s = _Schema(where)
    files = manifest.get("files", _MISSING)
    if not isinstance(files, dict) or not files:
        s.fail("files", "a non-empty object of file name -> SHA-256 hex digest", files)
    for name, digest in files.items():
        check_name(name, "a name in 'files'", where)
        if name in UNLISTED:
            raise RuntimeArtifactError(f"{where}: 'files' lists '{name}', which is never listed (it cannot be hashed "
                                       f"into the manifest it belongs to); {REBUILD}")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            s.fail(f'files["{name}"]', "a SHA-256 digest of 64 lowercase hex digits", digest)
    s.listed(manifest.get("model_file", _MISSING), "model_file", files)
    inputs, outputs = _specs(s, manifest, "inputs"), _specs(s, manifest, "outputs")
    pre = s.obj(manifest, "preprocess", "preprocess")
    kind = s.get(pre, "kind", "preprocess.kind", f"one of {', '.join(KIND_SCHEMAS)}", lambda v: isinstance(v, str) and v in KIND_SCHEMAS)
    KIND_SCHEMAS[kind](s, manifest, pre, inputs, outputs, files)
    export = s.obj(manifest, "export", "export", optional=True)
    buckets = s.get(export or {}, "buckets", "export.buckets", "a list of {seq_len, model_file} objects",
                    lambda v: isinstance(v, list), optional=True)
    for i, bucket in enumerate(buckets or []):
        if not isinstance(bucket, dict):
            s.fail(f"export.buckets[{i}]", "an object with seq_len and model_file", bucket)
        s.get(bucket, "seq_len", f"export.buckets[{i}].seq_len", "an int >= 1", lambda v: _int(v, 1))
        s.listed(bucket.get("model_file", _MISSING), f"export.buckets[{i}].model_file", files)
    if complete:
        _check_described(s, manifest)
    return manifest


def _check_lm(s: _Schema, pre: dict, inputs: dict, outputs: dict) -> None:
    layers = s.get(pre, "num_layers", "preprocess.num_layers", "an int >= 1", lambda v: _int(v, 1))
    s.get(pre, "head_dim", "preprocess.head_dim", "an int >= 1", lambda v: _int(v, 1))
    s.get(pre, "kv_heads", "preprocess.kv_heads", f"an int >= 1 or a list of {layers} of them",
          lambda v: _int(v, 1) or (_ints(v, 1) and len(v) == layers))
    s.get(pre, "eos_token_ids", "preprocess.eos_token_ids", "a list of token ids", _ints, optional=True)
    shared = s.get(pre, "kv_cache", "preprocess.kv_cache", "\"shared\" or absent", lambda v: v == "shared", optional=True)
    s.get(pre, "max_length", "preprocess.max_length", "an int >= 1 (the positions a fused graph holds)",
          lambda v: _int(v, 1), optional=not shared)
    s.get(pre, "prefill_chunk", "preprocess.prefill_chunk", "an int >= 0", _int, optional=True)
    s.get(pre, "min_kv_slots", "preprocess.min_kv_slots", "an int >= 0", _int, optional=True)
    kv = [f"{i}.{k}" for i in range(layers) for k in ("key", "value")]
    _require(s, "inputs", inputs, ["input_ids", "attention_mask"] + [f"past_key_values.{n}" for n in kv],
             f"a language model of {layers} layers")
    _require(s, "outputs", outputs, ["logits"] + [f"present.{n}" for n in kv], f"a language model of {layers} layers")


def _check_speech(s: _Schema, manifest: dict, pre: dict, files: dict, outputs: dict) -> None:
    for key in ("sampling_rate", "n_fft", "hop_length", "num_frames"):
        s.get(pre, key, f"preprocess.{key}", "an int >= 1", lambda v: _int(v, 1))
    sp = s.obj(manifest, "speech", "speech")
    for key in ("cross_kv_file", "decoder_file", "mel_filters_file"):
        s.listed(sp.get(key, _MISSING), f"speech.{key}", files)
    for key in ("decoder_layers", "heads", "head_dim", "max_target_positions"):
        s.get(sp, key, f"speech.{key}", "an int >= 1", lambda v: _int(v, 1))
    s.get(sp, "eot_id", "speech.eot_id", "a token id (int >= 0)", _int)
    s.get(sp, "prefix_ids", "speech.prefix_ids", "a non-empty list of token ids, shorter than max_target_positions",
          lambda v: _ints(v) and 0 < len(v) < sp["max_target_positions"])
    for key in ("suppress_ids", "begin_suppress_ids"):
        s.get(sp, key, f"speech.{key}", "a list of token ids", _ints)
    _require(s, "outputs", outputs, ["hidden", "frame_sizes"], "a speech encoder's")


def _check_described(s: _Schema, m: dict) -> None:
    """The keys `compress inspect`, `bench` and `report` read from a published artifact."""
    src = s.obj(m, "source", "source")
    s.get(src, "spec", "source.spec", "a string", lambda v: isinstance(v, str))
    model = s.obj(m, "model", "model")
    for key in ("family", "modality"):
        s.get(model, key, f"model.{key}", "a string", lambda v: isinstance(v, str))
    for key in ("layers", "hidden_size", "heads"):
        s.get(model, key, f"model.{key}", "an int", _int)
    passes = s.get(m, "passes", "passes", "a list of pass records", lambda v: isinstance(v, list))
    for i, p in enumerate(passes):
        if not isinstance(p, dict):
            s.fail(f"passes[{i}]", "an object with name, options and seconds", p)
        s.get(p, "name", f"passes[{i}].name", "a string", lambda v: isinstance(v, str))
        s.obj(p, "options", f"passes[{i}].options")
        s.get(p, "seconds", f"passes[{i}].seconds", "a number", _num)
    plan = s.obj(m, "token_plan", "token_plan")
    s.get(plan, "token_counts", "token_plan.token_counts", "a list of ints", _ints)
    flops = s.obj(m, "flops", "flops")
    for key in ("dense", "compressed", "ratio"):
        s.get(flops, key, f"flops.{key}", "a number", _num)
    params = s.obj(m, "params", "params")
    for key in ("dense", "compressed"):
        s.get(params, key, f"params.{key}", "a number", _num)
    validation = s.obj(m, "validation", "validation")
    s.get(validation, "passed", "validation.passed", "true or false", lambda v: isinstance(v, bool))


# ---------------------------------------------------------------- reading


def parse_manifest(raw: bytes, where: str = MANIFEST):
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RuntimeArtifactError(f"{where} is not valid JSON ({reason}); the artifact is damaged, {REBUILD}") from None


def read_manifest(folder: str | Path, verify: bool = True, *, verify_key=None, complete: bool = True) -> dict:
    """Read an artifact's manifest and check it against the schema (`check_manifest`); with `verify`, the folder too:
    every file in it listed, nothing linked out of it, every listed file present and matching its SHA-256.

    `verify_key`: an Ed25519 public key (see signing.public_key); manifest.sig must then verify over the exact bytes
    read, before anything in them is used. `complete` also requires the descriptive keys the `compress` commands read;
    load() passes False, since the runtime needs only what it runs.
    """
    folder = Path(folder)
    raw = read_manifest_bytes(folder)
    if verify_key is not None:
        from .signing import verify_signature

        verify_signature(folder, verify_key, raw)
    where = str(folder / MANIFEST)
    manifest = check_manifest(parse_manifest(raw, where), where, complete)
    if verify:
        verify_files(folder, manifest)
    return manifest


def _encoder_io(s, manifest: dict) -> None:
    _static(s, "inputs[0]", manifest["inputs"][0])
    _static(s, "outputs[0]", manifest["outputs"][0])


def _check_text(s, manifest: dict, pre: dict, inputs: dict, outputs: dict, files: dict) -> None:
    s.listed(pre.get("tokenizer", _MISSING), "preprocess.tokenizer", files)
    _encoder_io(s, manifest)
    s.get(pre, "pad_id", "preprocess.pad_id", "an int >= 0", _int)
    _require(s, "inputs", inputs, ["input_ids", "attention_mask"], "a text encoder's feeds")
    for name in ("input_ids", "attention_mask"):
        if len(inputs[name]["shape"]) != 2:
            s.fail(f"inputs.{name}.shape", "[batch, seq_len]", inputs[name]["shape"])
        _static(s, f"inputs.{name}", inputs[name])


def _check_image(s, manifest: dict, pre: dict, inputs: dict, outputs: dict, files: dict) -> None:
    _encoder_io(s, manifest)
    s.get(pre, "size", "preprocess.size", "[height, width], ints >= 1", lambda v: _ints(v, 1) and len(v) == 2)
    for key in ("mean", "std"):
        s.get(pre, key, f"preprocess.{key}", "three numbers (R, G, B)",
              lambda v: isinstance(v, list) and len(v) == 3 and all(_num(x) for x in v))
    if 0 in pre["std"]:
        s.fail("preprocess.std", "three non-zero numbers", pre["std"])
    s.get(pre, "resample", "preprocess.resample", "one of bicubic, bilinear, nearest",
          lambda v: v in ("bicubic", "bilinear", "nearest"), optional=True)
    s.get(pre, "crop", "preprocess.crop", "true or false", lambda v: isinstance(v, bool), optional=True)


def _check_lm_kind(s, manifest: dict, pre: dict, inputs: dict, outputs: dict, files: dict) -> None:
    s.listed(pre.get("tokenizer", _MISSING), "preprocess.tokenizer", files)
    _check_lm(s, pre, inputs, outputs)


def _check_speech_kind(s, manifest: dict, pre: dict, inputs: dict, outputs: dict, files: dict) -> None:
    s.listed(pre.get("tokenizer", _MISSING), "preprocess.tokenizer", files)
    _check_speech(s, manifest, pre, files, outputs)


# the schema of each kind of artifact (the manifest's preprocess.kind), checked after the common keys
KIND_SCHEMAS = {"text": _check_text, "image": _check_image, "causal_lm": _check_lm_kind, "speech": _check_speech_kind}
