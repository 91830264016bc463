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

from compressor.errors import CompressorError
from compressor.program.capture import capture, graph_stats

OUTPUT_NAME = "pooled"  # unique: fx node names such as "embedding" would collide with a plainer name
OPSET = 18


@contextlib.contextmanager
def quiet(*logger_names: str):
    """Exporters, optimizers and quantizers print progress and advice on every call: keep the user's terminal clean
    (these loggers at ERROR, warnings and stdout swallowed) for the duration."""
    loggers = [logging.getLogger(n) if n else logging.getLogger() for n in logger_names]
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


EXPORT_LOGGERS = ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")


def lower_to_onnx(program: torch.export.ExportedProgram, example_inputs, input_names: list[str], path: Path) -> Path:
    """Write `path` as a checked ONNX model (portable: no onnxruntime-specific fused ops are baked in)."""
    return _lower(program, example_inputs, input_names, [OUTPUT_NAME], path, "ONNX lowering")


def _lower(program: torch.export.ExportedProgram, example_inputs, input_names, output_names, path: Path, what: str) -> Path:
    """Translate a captured program to ONNX, save it, run the ONNX checker and build onnxruntime's optimised session."""
    try:
        with quiet(*EXPORT_LOGGERS), torch.no_grad():
            onnx_program = torch.onnx.export(
                program, tuple(example_inputs), dynamo=True, input_names=input_names,
                output_names=output_names, optimize=True, verbose=False, opset_version=OPSET,
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
        raise CompressorError(f"{what} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return path


def decoder_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names in the optimum-onnx decoder convention."""
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", *past], ["logits", *present]


def lower_decoder_to_onnx(program: torch.nn.Module, adapter, path: Path) -> Path:
    """Export a DecoderProgram with dynamic batch, sequence and past lengths (one graph for prefill and decode)."""
    from torch.export import Dim

    b, s, p = 2, 5, 3
    ids = torch.randint(0, adapter.config.vocab_size, (b, s))
    mask = torch.ones(b, p + s, dtype=torch.long)
    past = [torch.zeros(b, kv, p, adapter.head_dim) for kv in adapter.kv_heads for _ in range(2)]
    auto = Dim.AUTO
    dynamic = ({0: auto, 1: auto}, {0: auto, 1: auto}, tuple({0: auto, 2: auto} for _ in past))  # *past is one tuple
    inputs, outputs = decoder_io_names(len(adapter.layers))
    args = (ids, mask, *past)
    try:
        with quiet(*EXPORT_LOGGERS), torch.no_grad():
            exported = torch.export.export(program, args, dynamic_shapes=dynamic, strict=False)
    except Exception as e:
        raise CompressorError(f"torch.export could not capture the decoder: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    return _lower(exported, args, inputs, outputs, path, "ONNX lowering of the decoder")


MODEL_FILE = "model.onnx"


def export_onnx(handle, folder, dense: bool = False, file_name: str = MODEL_FILE):
    """Capture the (dense or compressed) program and lower it into folder/file_name; returns graph stats."""
    example = handle.example_inputs()
    program = capture(handle.program(dense=dense), example)
    stats = graph_stats(program)
    lower_to_onnx(program, example, [s.name for s in handle.input_specs()], folder / file_name)
    return stats

