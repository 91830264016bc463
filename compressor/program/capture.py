"""Capture with torch.export: the graph IR on which FLOPs, parameters and static shapes are read."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.errors import CompressorError

aten = torch.ops.aten


@dataclass
class GraphStats:
    flops: int  # multiply-accumulates x 2 of matmul-like ops (linear, matmul, conv)
    params: int  # floating-point parameter and constant elements the graph reads (weights, not index buffers)
    static: bool  # every intermediate shape is a concrete int

    def to_json(self) -> dict:
        return {"flops": self.flops, "params": self.params, "static_shapes": self.static}


def capture(module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    try:
        with torch.no_grad():
            return torch.export.export(module, example_inputs, strict=False)
    except Exception as e:
        raise CompressorError(f"torch.export could not capture the model: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def _shape(node) -> tuple[int, ...] | None:
    val = node.meta.get("val") if hasattr(node, "meta") else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _node_flops(node) -> int:
    target, args = node.target, node.args
    out = _shape(node)
    if out is None:
        return 0
    if target in (aten.linear.default,):
        k = _shape(args[0])[-1]
        return 2 * _numel(out) * k
    if target in (aten.addmm.default, aten.mm.default):
        a = _shape(args[1] if target == aten.addmm.default else args[0])
        return 2 * _numel(out) * a[-1]
    if target in (aten.bmm.default, aten.matmul.default, aten.baddbmm.default):
        a = _shape(args[1] if target == aten.baddbmm.default else args[0])
        return 2 * _numel(out) * a[-1]
    if target in (aten.conv2d.default, aten.convolution.default):
        w = _shape(args[1])
        return 2 * _numel(out) * _numel(w[1:])
    return 0


def graph_stats(program: torch.export.ExportedProgram) -> GraphStats:
    flops, static = 0, True
    for node in program.graph.nodes:
        if node.op == "call_function":
            flops += _node_flops(node)
            shape = _shape(node)
            if shape is not None and not all(isinstance(d, int) for d in shape):
                static = False
    sig = program.graph_signature
    used = set(sig.inputs_to_parameters.values()) | set(sig.inputs_to_buffers.values())
    used |= set(getattr(sig, "inputs_to_lifted_tensor_constants", {}).values())
    state = dict(program.state_dict)
    state.update(getattr(program, "constants", {}) or {})
    seen, params = set(), 0
    for name in used:
        t = state.get(name)
        # weights only (index buffers such as position ids are not parameters); tied weights count once
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            params += int(t.numel())
    return GraphStats(int(flops), int(params), static)
