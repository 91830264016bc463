"""Latency of a handle's program as the artifact will run it: exported to ONNX in a temporary folder and timed with
onnxruntime at the compiled shapes, several handles interleaved in one run (the machine's load drifts), for passes
whose budgets are measured rather than counted (width_prune and learned_rates `latency`)."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from compressor.export.bench import time_interleaved
from compressor.runtime.model import make_session

LATENCY_TOLERANCE = 0.04  # a measured latency budget is re-spent while the measured ratio misses it by more than this
# fraction of itself (4%: inside the 5% a speed-up budget allows)
LATENCY_ATTEMPTS = 3  # timings of the result at most


def export_for_timing(handle, path: Path) -> Path:
    """The program as the artifact will run it (decoders: the one dynamic-shape graph with a KV cache)."""
    if handle.adapter.modality == "causal_lm":
        from compressor.export.onnx import lower_decoder_to_onnx

        return lower_decoder_to_onnx(handle.program(), handle.adapter, path)
    from compressor.export.compile import export_onnx

    export_onnx(handle, path.parent)
    return path.parent / "model.onnx"


def feeds_for(handle) -> dict[str, np.ndarray]:
    if handle.adapter.modality == "causal_lm":
        from compressor.export.onnx import decoder_io_names

        names = decoder_io_names(handle.num_layers)[0]
    else:
        names = [s.name for s in handle.input_specs()]
    return {n: t.numpy() for n, t in zip(names, handle.example_inputs())}


def time_handles(handles: dict[str, object], repeats: int = 10, threads: int = 2) -> dict[str, float]:
    """Median onnxruntime ms of each handle's program at its compiled shapes, timed interleaved in one run."""
    with tempfile.TemporaryDirectory(prefix="compressor-latency-") as tmp:
        sessions, feeds = {}, {}
        for name, h in handles.items():
            folder = Path(tmp) / name
            folder.mkdir()
            sessions[name] = make_session(export_for_timing(h, folder / "model.onnx"), threads=threads)
            feeds[name] = feeds_for(h)
        times = {n: [] for n in handles}
        for _ in range(max(1, repeats // 5)):  # interleave in rounds: the machine's load drifts
            got = {n: time_interleaved({n: sessions[n]}, feeds[n], 5, 1)[n] for n in handles}
            for n in handles:
                times[n] += got[n]
    return {n: statistics.median(t) for n, t in times.items()}


def time_module_at_sizes(module, example: tuple, sizes: list[int], repeats: int = 10, threads: int = 2) -> list[float]:
    """Median onnxruntime ms of `module` at each token count in `sizes`: exported once with a dynamic axis 1 on every
    input (`example` at the largest size), then run on the examples cut to each size, sizes interleaved per round."""
    import torch

    from compressor.export.onnx import EXPORT_LOGGERS, OPSET, quiet

    tokens = torch.export.Dim("tokens", min=2, max=example[0].shape[1])
    with tempfile.TemporaryDirectory(prefix="compressor-latency-") as tmp, quiet(*EXPORT_LOGGERS), torch.no_grad():
        path = Path(tmp) / "block.onnx"
        torch.onnx.export(module, example, dynamo=True, dynamic_shapes=tuple({1: tokens} for _ in example),
                          optimize=True, verbose=False, opset_version=OPSET).save(str(path))
        session = make_session(path, threads=threads)
        names = [i.name for i in session.get_inputs()]
        feeds = {n: {name: t[:, :n].numpy() for name, t in zip(names, example)} for n in sizes}
        for n in sizes:  # warm-up: onnxruntime plans each new shape on its first run
            session.run(None, feeds[n])
        times = {n: [] for n in sizes}
        for _ in range(repeats):
            for n in sizes:
                t = time.perf_counter()
                session.run(None, feeds[n])
                times[n].append((time.perf_counter() - t) * 1000.0)
    return [statistics.median(times[n]) for n in sizes]
