"""`compress bench`: an artifact against the dense export of the same source model, same shapes, same run.

Runs are interleaved (dense, compressed, compressed, dense, ...) on the same real held-out batch, and the medians
are compared, so machine noise hits both sides alike.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path

from compressor.runtime.artifact import read_manifest
from compressor.runtime.model import make_session

from .cache import cache_dir
from .errors import UsageError


def dense_export(manifest: dict) -> Path:
    """The dense ONNX for the artifact's source at its shapes, exported once and cached by weights hash and shapes."""
    from . import __version__
    from .compile import MODEL_FILE, export_onnx
    from .handle import load

    src = manifest["source"]
    key = hashlib.sha256(json.dumps([src["weights_sha256"], manifest["shapes"], __version__], sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir() / "dense" / key
    if (folder / MODEL_FILE).exists():
        return folder / MODEL_FILE
    spec = src["spec"] if src["spec"].startswith("example:") else src["folder"]
    handle = load(spec, **manifest["shapes"])
    if handle.source.weights_sha256 != src["weights_sha256"]:
        raise UsageError(f"the source model at '{spec}' changed since the artifact was built (weights hash differs); rebuild the artifact")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{MODEL_FILE}.tmp"
    tmp.mkdir(exist_ok=True)
    export_onnx(handle, tmp, dense=True)
    (tmp / MODEL_FILE).rename(folder / MODEL_FILE)
    tmp.rmdir()
    return folder / MODEL_FILE


def held_out_batch(manifest: dict):
    from .handle import load
    from .inputs import feed_batches

    src = manifest["source"]
    handle = load(src["spec"] if src["spec"].startswith("example:") else src["folder"], **manifest["shapes"])
    return feed_batches(handle, "validation", manifest["shapes"]["batch"])[0]


def time_interleaved(sessions: dict, feeds: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    names = list(sessions)
    for _ in range(warmup):
        for n in names:
            sessions[n].run(None, feeds)
    times = {n: [] for n in names}
    for i in range(repeats):
        order = names if i % 2 == 0 else names[::-1]
        for n in order:
            t = time.perf_counter()
            sessions[n].run(None, feeds)
            times[n].append((time.perf_counter() - t) * 1000.0)
    return times


def bench_artifact(path: str | Path, repeats: int = 20, warmup: int = 3, threads: int = 2, progress=None) -> dict:
    if repeats < 1 or warmup < 0 or threads < 1:
        raise UsageError("bench needs repeats >= 1, warmup >= 0 and threads >= 1")
    step = progress or (lambda msg: None)
    path = Path(path)
    manifest = read_manifest(path, verify=True)
    step("exporting the dense baseline (cached after the first time)")
    dense_path = dense_export(manifest)
    feeds = held_out_batch(manifest)
    sessions = {"dense": make_session(dense_path, threads=threads), "compressed": make_session(path / manifest["model_file"], threads=threads)}
    step(f"timing {repeats} interleaved runs per model")
    times = time_interleaved(sessions, feeds, repeats, warmup)
    dense_ms, comp_ms = statistics.median(times["dense"]), statistics.median(times["compressed"])
    speedup = dense_ms / comp_ms
    flops_ratio = manifest["flops"]["ratio"]
    return {
        "artifact": str(path),
        "source": manifest["source"]["spec"],
        "shapes": manifest["shapes"],
        "threads": threads,
        "repeats": repeats,
        "dense_ms": dense_ms,
        "compressed_ms": comp_ms,
        "dense_ms_min": min(times["dense"]),
        "compressed_ms_min": min(times["compressed"]),
        "speedup": speedup,
        "flops_ratio": flops_ratio,
        "efficiency": speedup / flops_ratio,
        "dense_flops": manifest["flops"]["dense"],
        "compressed_flops": manifest["flops"]["compressed"],
        "token_counts": manifest["token_plan"]["token_counts"],
    }
