"""Execution providers: short names ("cuda", "tensorrt", "cpu") or onnxruntime's full names, checked against what the
installed onnxruntime offers, with an explicit opt-in to fall back to CPU."""

from __future__ import annotations

import warnings

from .errors import FeedTypeError, ProviderError

CPU = "CPUExecutionProvider"
SHORT_NAMES = {
    "cpu": CPU,
    "cuda": "CUDAExecutionProvider",
    "gpu": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "directml": "DmlExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}
GPU_HINT = "for CUDA/TensorRT install onnxruntime-gpu in place of onnxruntime (pip install 'compressor[gpu]')"


def _name_of(entry) -> str:
    """A provider entry is a name or onnxruntime's (name, options) pair."""
    if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], dict):
        return entry[0]
    if isinstance(entry, str):
        return entry
    raise FeedTypeError(f"execution providers are names like 'cuda' or (name, options) pairs, got {type(entry).__name__}")


def full_name(name: str) -> str:
    """'cuda' -> 'CUDAExecutionProvider'; full names (any case) come back as onnxruntime spells them."""
    key = name.strip().lower()
    if key in SHORT_NAMES:
        return SHORT_NAMES[key]
    known = {v.lower(): v for v in SHORT_NAMES.values()}
    return known.get(key, name.strip())


def resolve_providers(requested=None, allow_fallback: bool = False, available: list[str] | None = None) -> list:
    """The providers list to open a session with, in the order asked, CPU last (it runs what others cannot).

    `requested`: None (CPU), a name, a comma-separated string, or a list of names or (name, options) pairs.
    A name the installed onnxruntime lacks is refused in one line that lists what exists, unless `allow_fallback`:
    then it is dropped with a warning (and CPU alone remains if nothing else does).
    """
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    if requested is None:
        return [CPU]
    if isinstance(requested, str):
        requested = [p for p in requested.split(",") if p.strip()]
    if not isinstance(requested, (list, tuple)):
        raise FeedTypeError(f"providers must be a list of names such as ['cuda', 'cpu'], got {type(requested).__name__}")
    chosen, missing = [], []
    for entry in requested:
        name = full_name(_name_of(entry))
        resolved = (name, entry[1]) if isinstance(entry, tuple) else name
        (chosen if name in available else missing).append(resolved)
    if missing:
        names = [_name_of(m) for m in missing]
        message = (f"execution provider(s) {', '.join(names)} not available in this onnxruntime "
                   f"(available: {', '.join(available)})")
        if not allow_fallback:
            hint = f"; {GPU_HINT}" if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(names) else ""
            raise ProviderError(f"{message}{hint}; or pass allow_fallback=True (CLI: --allow-cpu-fallback) to run on CPU")
        warnings.warn(f"{message}; falling back to {', '.join(map(_name_of, chosen)) or 'CPU'}", RuntimeWarning, stacklevel=3)
    if CPU not in [_name_of(c) for c in chosen]:
        chosen.append(CPU)
    return chosen


def check_session_providers(session, chosen: list, allow_fallback: bool) -> None:
    """onnxruntime drops a provider whose libraries fail to load (CUDA without its runtime) and carries on with CPU:
    refuse that quietly-slower session unless fallback was allowed."""
    dropped = [_name_of(c) for c in chosen if _name_of(c) not in session.get_providers()]
    if not dropped:
        return
    message = f"onnxruntime could not start {', '.join(dropped)} (its libraries did not load; see onnxruntime's log)"
    if not allow_fallback:
        raise ProviderError(f"{message}; fix the installation or pass allow_fallback=True (CLI: --allow-cpu-fallback) to "
                            "run on CPU")
    warnings.warn(f"{message}; running on {', '.join(session.get_providers())}", RuntimeWarning, stacklevel=3)
