"""What a user would run instead of our artifact: the dense source model exported with dynamic batch and sequence
axes (run batched by length), and that export after onnxruntime's transformer optimizer (and INT8 on top).

The `fused` baseline is exported the way optimum exports (transformers' own forward through the TorchScript
exporter), because that is the graph onnxruntime's fusions were written for: it gets fused Attention, SkipLayerNorm
and EmbedLayerNorm, which the dynamo export of the same model does not. Our artifacts stay dynamo exports; this is a
baseline only. Every export is cached by source weights hash and shapes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from compressor.errors import UsageError
from compressor.sources.cache import cache_dir
from compressor.sources.source import SourceInfo

MODEL_FILE = "model.onnx"


def source_handle(manifest: dict):
    """The artifact's source model, reloaded at its shapes; refuses a source whose weights changed."""
    from compressor.program.handle import load

    src = manifest["source"]
    spec = SourceInfo(**src).reload_spec
    handle = load(spec, **manifest["shapes"])
    if handle.source.weights_sha256 != src["weights_sha256"]:
        raise UsageError(f"the source model at '{spec}' changed since the artifact was built (weights hash differs); rebuild the artifact")
    return handle


def _folder(manifest: dict, kind: str) -> Path:
    from compressor import __version__

    src = manifest["source"]
    key = hashlib.sha256(json.dumps([src["weights_sha256"], manifest["shapes"], __version__, kind], sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "dense" / f"{key}-{kind}"


def _dynamic_axes(handle) -> list[dict[int, str]]:
    """Batch is dynamic for every input; for text, the sequence too (images keep their compiled size)."""
    text = handle.target.text
    return [{0: "batch", 1: "sequence"} if text else {0: "batch"} for _ in handle.input_specs()]


def dense_dynamic(manifest: dict) -> Path:
    """Our dense program (dynamo export, as our artifacts) with dynamic axes."""
    from torch.export import Dim

    from compressor.lower.onnx import OUTPUT_NAME, _lower

    folder = _folder(manifest, "dynamic")
    if (folder / MODEL_FILE).exists():
        return folder / MODEL_FILE
    handle = source_handle(manifest)
    example = handle.example_inputs()
    dims = (tuple({axis: Dim.AUTO for axis in axes} for axes in _dynamic_axes(handle)),)  # forward(*inputs)
    with torch.no_grad():
        program = torch.export.export(handle.program(dense=True), example, dynamic_shapes=dims, strict=False)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{MODEL_FILE}.tmp"
    _lower(program, example, [s.name for s in handle.input_specs()], [OUTPUT_NAME], tmp, "dynamic dense export")
    tmp.rename(folder / MODEL_FILE)
    return folder / MODEL_FILE


class _Reference(torch.nn.Module):
    """transformers' own forward and pooling, the module optimum would export."""

    def __init__(self, adapter):
        super().__init__()
        self.adapter, self.model = adapter, adapter.model

    def forward(self, *inputs):
        return self.adapter.reference_forward(*inputs)


def dense_fused(manifest: dict) -> tuple[Path, dict]:
    """The fused dense baseline and its record (exporter, fused operator counts)."""
    from compressor.lower.onnx import EXPORT_LOGGERS, OUTPUT_NAME, quiet
    from compressor.lower.optimize import fuse_transformer

    folder = _folder(manifest, "fused")
    if (folder / MODEL_FILE).exists():
        return folder / MODEL_FILE, json.loads((folder / "fusion.json").read_text())
    handle = source_handle(manifest)
    example, names = handle.example_inputs(), [s.name for s in handle.input_specs()]
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / "unfused.onnx"
    try:
        with quiet(*EXPORT_LOGGERS), torch.no_grad():
            torch.onnx.export(_Reference(handle.adapter).eval(), tuple(example), str(raw), dynamo=False,
                              input_names=names, output_names=[OUTPUT_NAME], opset_version=17,
                              dynamic_axes=dict(zip(names, _dynamic_axes(handle))))
        exporter = "torchscript (as optimum)"
    except Exception as e:  # the TorchScript exporter may go away; the dynamo export still fuses what it can
        raw.write_bytes(dense_dynamic(manifest).read_bytes())
        exporter = f"dynamo (torchscript failed: {type(e).__name__})"
    cfg = handle.adapter.config
    record = fuse_transformer(raw, folder / f".{MODEL_FILE}.tmp", cfg.model_type, cfg.num_attention_heads,
                              cfg.hidden_size, ours=False)
    record["exporter"] = exporter
    if not record["model_type"]:
        (folder / f".{MODEL_FILE}.tmp").write_bytes(raw.read_bytes())
    raw.unlink()
    (folder / "fusion.json").write_text(json.dumps(record))
    (folder / f".{MODEL_FILE}.tmp").rename(folder / MODEL_FILE)
    return folder / MODEL_FILE, record


def dense_fused_int8(manifest: dict) -> Path:
    """The fused dense baseline with INT8 dynamic quantization (per channel), as optimum's quantizer gives."""
    from compressor.lower.optimize import quantize_int8_dynamic

    fused, _ = dense_fused(manifest)
    path = fused.with_name("model.int8.onnx")
    if not path.exists():
        tmp = fused.with_name(".model.int8.onnx.tmp")
        quantize_int8_dynamic(fused, tmp, per_channel=True)
        tmp.rename(path)
    return path


def dense_decoder_fused(manifest: dict, dense_path: Path, int8: bool = False) -> tuple[Path, dict]:
    """A language model's dense export (our dynamic-shape decoder graph: no other exporter yields its KV-cache
    layout) after onnxruntime's transformer optimizer, and with `int8` also INT8 dynamic (per channel): the
    decoder baselines a user could deploy instead. Cached beside the other dense exports."""
    from compressor.lower.optimize import fuse_transformer, quantize_int8_dynamic

    folder = _folder(manifest, "fused-decoder")
    fused, about = folder / MODEL_FILE, folder / "fusion.json"
    if not fused.exists():
        folder.mkdir(parents=True, exist_ok=True)
        # heads and width 0: the optimizer reads them from the dense graph (the artifact's may be pruned or sliced)
        record = fuse_transformer(dense_path, folder / f".{MODEL_FILE}.tmp", manifest["source"]["model_type"], 0, 0)
        if not record["model_type"]:
            (folder / f".{MODEL_FILE}.tmp").write_bytes(dense_path.read_bytes())
        record["exporter"] = "dynamo (ours, dense)"
        about.write_text(json.dumps(record))
        (folder / f".{MODEL_FILE}.tmp").rename(fused)
    record = json.loads(about.read_text())
    if not int8:
        return fused, record
    path, about_int8 = folder / "model.int8.onnx", folder / "int8.json"
    if not path.exists():
        from compressor.lower.optimize import keep_float_modules

        # the same FP32 exceptions as our decoder artifacts get: the strongest INT8 baseline we know how to build
        keep = keep_float_modules(source_handle(manifest).adapter)
        about_int8.write_text(json.dumps(quantize_int8_dynamic(fused, folder / ".model.int8.onnx.tmp", True, keep)))
        (folder / ".model.int8.onnx.tmp").rename(path)
    return path, dict(record, quantization=json.loads(about_int8.read_text()))


def dense_export(manifest: dict) -> Path:
    """The dense ONNX for the artifact's source at its shapes, exported once and cached by weights hash and shapes."""
    from compressor import __version__
    from compressor.lower.onnx import MODEL_FILE, export_onnx
    from compressor.program.handle import load

    src = manifest["source"]
    key = hashlib.sha256(json.dumps([src["weights_sha256"], manifest["shapes"], __version__], sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir() / "dense" / key
    if (folder / MODEL_FILE).exists():
        return folder / MODEL_FILE
    spec = SourceInfo(**src).reload_spec
    handle = load(spec, **manifest["shapes"])
    if handle.source.weights_sha256 != src["weights_sha256"]:
        raise UsageError(f"the source model at '{spec}' changed since the artifact was built (weights hash differs); rebuild the artifact")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{MODEL_FILE}.tmp"
    tmp.mkdir(exist_ok=True)
    if handle.target.decoder:
        from compressor.lower.onnx import lower_decoder_to_onnx

        lower_decoder_to_onnx(handle.program(), handle.adapter, tmp / MODEL_FILE)
    else:
        export_onnx(handle, tmp, dense=True)
    (tmp / MODEL_FILE).rename(folder / MODEL_FILE)
    tmp.rmdir()
    return folder / MODEL_FILE
