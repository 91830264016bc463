"""Lower a captured program to ONNX (dynamo exporter with its graph optimiser), run the ONNX checker, and check that
onnxruntime can build its fully optimised session."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

from .errors import CompressorError

OUTPUT_NAME = "pooled"  # unique: fx node names such as "embedding" would collide with a plainer name
OPSET = 18


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress and warns about optional torchvision ops; keep the user's terminal clean."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def lower_to_onnx(program: torch.export.ExportedProgram, example_inputs, input_names: list[str], path: Path) -> Path:
    """Write `path` as a checked ONNX model (portable: no onnxruntime-specific fused ops are baked in)."""
    try:
        with _quiet():
            onnx_program = torch.onnx.export(
                program, tuple(example_inputs), dynamo=True, input_names=input_names,
                output_names=[OUTPUT_NAME], optimize=True, verbose=False, opset_version=OPSET,
            )
            onnx_program.save(str(path))
        onnx.checker.check_model(str(path), full_check=True)
        # onnxruntime applies its full graph optimisation when it loads the model; build that session once here so a
        # graph it cannot optimise fails the compile, not the user's first load
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except CompressorError:
        raise
    except Exception as e:
        raise CompressorError(f"ONNX lowering failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return path
