"""Lower a decoder to onnxruntime's fused operators, written from the adapter's description (not traced).

Why write it rather than trace and fuse: onnxruntime's optimizer recognises attention only in the shapes its own
exporters emit; our traced graph (rotary as Slice/Neg/Concat, cache concatenation, per-layer head counts after
width pruning, SliceGPT shortcuts) never matches its patterns, so it stayed op by op. Written from the adapter, every
block gets the fused operators whatever passes did to it: GroupQueryAttention with rotary inside and one KV buffer
shared by past and present (`past_present_share_buffer`), SkipSimplifiedLayerNormalization for residual + RMSNorm,
MatMulNBits for 4/8-bit weights. Per-block head counts, MLP widths, removed blocks and sliced widths are just the
shapes of each block's weights.

Inputs and outputs follow onnxruntime-genai's decoder convention, so the same graph runs under its generator:
input_ids (B, S) int64, attention_mask (B, T) int64 (1 for every real token, right padded), past_key_values.i.key /
.value (B, kv_i, P, head_dim); outputs logits (B, S, V) and present.i.key / .value. In the shared-buffer mode the
runtime binds one preallocated (B, kv_i, max_length, head_dim) buffer as both past and present of a layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from compressor.export.nbits import split_zero_points

OPSET = 21
MS = "com.microsoft"
EXTERNAL_DATA_ABOVE = 1 << 30  # bytes of weights above which they go to model.onnx.data (protobuf caps at 2 GB)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def rms_norm_params(norm: torch.nn.Module) -> tuple[np.ndarray, float]:
    """The effective gamma and epsilon of an RMSNorm module (Gemma's scale by 1 + w; Llama's, Qwen's by w)."""
    w = to_numpy(norm.weight)
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None:
        eps = norm.eps
    if "Gemma" in type(norm).__name__:
        w = w + 1.0
    return w.astype(np.float32), float(eps)


@dataclass
class GraphBuilder:
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    names: set = field(default_factory=set)

    def init(self, name: str, array: np.ndarray) -> str:
        assert name not in self.names, name
        self.names.add(name)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "", **attrs):
        outs = [f"{name}/out{i}" for i in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs


@dataclass
class LoweringOptions:
    """What the lowering emits. `weights(name, W)` returns an NBitsWeight for a linear to run as MatMulNBits, or None
    to keep it as an FP32 MatMul; `max_length` bounds positions (the rotary tables' rows, the KV buffers)."""

    max_length: int = 4096
    weights: Callable | None = None
    accuracy_level: int = 0
    pack_qkv: bool = True


def linear(g: GraphBuilder, x: str, name: str, parts: list[tuple[np.ndarray, np.ndarray | None]],
           opts: LoweringOptions, nbits=None) -> str:
    """y = x @ W.T + b for W the rows of `parts` stacked (q, k, v in one matmul; gate and up in one), as an FP32
    MatMul or a MatMulNBits (the NBitsWeight given, or the one opts.weights returns for these parts)."""
    bias = stacked_bias(parts)
    if nbits is None and opts.weights is not None:
        nbits = opts.weights(name, [w for w, _ in parts])
    offsets = None
    if nbits is not None and nbits.zero_points is not None and nbits.zero_points.dtype != np.uint8:
        nbits, offsets = split_zero_points(nbits)  # float zero points: the kernels' slow path; split them off
    if nbits is None:
        weight = stacked_weight(parts)  # stacked only where it ships as FP32
        y = g.op("MatMul", [x, g.init(f"{name}.weight_t", weight.T)], f"{name}/MatMul")
        if bias is not None:
            y = g.op("Add", [y, g.init(f"{name}.bias", bias)], f"{name}/Add")
        return y
    inputs = [x, g.init(f"{name}.qweight", nbits.packed), g.init(f"{name}.scales", nbits.scales)]
    inputs.append(g.init(f"{name}.zero_points", nbits.zero_points) if nbits.zero_points is not None else "")
    if bias is not None:
        inputs += ["", g.init(f"{name}.bias", bias)]  # g_idx unused
    while inputs and inputs[-1] == "":
        inputs.pop()
    y = g.op("MatMulNBits", inputs, f"{name}/MatMulNBits", domain=MS, K=nbits.k, N=nbits.n, bits=nbits.bits,
             block_size=nbits.block_size, accuracy_level=opts.accuracy_level)
    if offsets is not None:
        y = g.op("Add", [y, block_offsets(g, x, name, nbits, offsets)], f"{name}/AddOffsets")
    return y


def block_offsets(g: GraphBuilder, x: str, name: str, nbits, offsets: np.ndarray) -> str:
    """The affine part of blocks stored as w = (q - 2^(bits-1)) * s + c (GGUF Q4_1 / Q4_K: a float minimum per
    block): x's sum over each block times c, as a small FP32 matmul (k / block_size inputs). onnxruntime's fast
    MatMulNBits kernels take integer zero points only (float ones fall back to a path 10-200x slower), so the float
    part is computed beside the kernel instead, exactly."""
    blocks = nbits.k // nbits.block_size
    shaped = g.op("Reshape", [x, g.init(f"{name}.block_shape", np.array([0, 0, blocks, nbits.block_size], np.int64))],
                  f"{name}/Blocks")
    sums = g.op("ReduceSum", [shaped, g.init(f"{name}.block_axis", np.array([-1], np.int64))], f"{name}/BlockSum",
                keepdims=0)
    return g.op("MatMul", [sums, g.init(f"{name}.offsets_t", np.ascontiguousarray(offsets.reshape(nbits.n, blocks).T))],
                f"{name}/Offsets")


def module_weights(lin: torch.nn.Linear) -> tuple[np.ndarray, np.ndarray | None]:
    return to_numpy(lin.weight), (to_numpy(lin.bias) if lin.bias is not None else None)


def stacked_weight(parts: list[tuple[np.ndarray, np.ndarray | None]]) -> np.ndarray:
    return parts[0][0] if len(parts) == 1 else np.concatenate([w for w, _ in parts])


def stacked_bias(parts: list[tuple[np.ndarray, np.ndarray | None]]) -> np.ndarray | None:
    """The parts' biases end to end (zeros for a part without one); None if no part has one."""
    if all(b is None for _, b in parts):
        return None
    return np.concatenate([b if b is not None else np.zeros(w.shape[0], np.float32) for w, b in parts])


def rotary_tables(ad, max_length: int) -> dict:
    """cos/sin caches (max_length, rotary_dim / 2) for each rotary table the blocks use, from the adapter's own rotary
    modules (so rope scaling and attention scaling are whatever transformers computes)."""
    positions = torch.arange(max_length)[None]
    probe = torch.zeros(1, max_length, 1)
    tables = {}
    for key in sorted({layer.rope for layer in ad.layers} or {None}, key=str):
        with torch.no_grad():
            cos, sin = ad.rotaries[key](probe, positions)
        half = cos.shape[-1] // 2
        tables[key] = (to_numpy(cos[0, :, :half]), to_numpy(sin[0, :, :half]))
    return tables


def qk_norm(g: GraphBuilder, x: str, norm, heads: int, head_dim: int, name: str) -> str:
    """Per-head RMSNorm of queries or keys (Qwen3, Gemma 3) before GroupQueryAttention rotates them."""
    gamma, eps = rms_norm_params(norm)
    shaped = g.op("Reshape", [x, g.init(f"{name}.shape", np.array([0, 0, heads, head_dim], np.int64))], f"{name}/Reshape")
    normed = g.op("SimplifiedLayerNormalization", [shaped, g.init(f"{name}.gamma", gamma)], f"{name}/Norm",
                  axis=-1, epsilon=eps, stash_type=1)
    return g.op("Reshape", [normed, g.init(f"{name}.back", np.array([0, 0, heads * head_dim], np.int64))], f"{name}/Back")


def fused_refusal(ad) -> str | None:
    """Why this model cannot take the fused lowering (None if it can): GroupQueryAttention rotates with cos/sin
    tables of a multiple of 8 entries per position, at most head_dim / 2."""
    rotary_dim = rotary_tables(ad, 1)
    for key, (cos, _) in rotary_dim.items():
        half = cos.shape[-1]
        if half % 8 or half > ad.head_dim // 2:
            return (f"GroupQueryAttention rotates a multiple of 16 channels per head, and this model rotates "
                    f"{2 * half} of {ad.head_dim}")
    for layer in ad.layers:
        if type(layer.act).__name__ not in SILUS + TANH_GELUS + GELUS:
            return f"no fused form for the activation {type(layer.act).__name__}"
    return None


def lower_decoder(ad, path: Path, opts: LoweringOptions | None = None) -> dict:
    """Write the fused decoder graph of adapter `ad` (any LlamaAdapter family) to `path`; returns what it did."""
    opts = opts or LoweringOptions()
    g = GraphBuilder()
    layers, hd = ad.layers, ad.head_dim
    n = len(layers)
    vocab = ad.config.vocab_size
    width = ad.embed_tokens.weight.shape[1]

    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])]
    for i, layer in enumerate(layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT,
                                                        ["batch", layer.kv_heads, "past", hd]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT,
                                                         ["batch", layer.kv_heads, "present", hd]))

    # lengths for GroupQueryAttention: seqlens_k = real tokens - 1 per row, total_sequence_length = mask width
    total = g.op("ReduceSum", ["attention_mask", g.init("one_axis", np.array([1], np.int64))], "mask/Sum", keepdims=0)
    seqlens = g.op("Cast", [g.op("Sub", [total, g.init("one_i64", np.array(1, np.int64))], "mask/Sub")], "mask/SeqlensK",
                   to=TensorProto.INT32)
    mask_shape = g.op("Shape", ["attention_mask"], "mask/Shape")
    total_len = g.op("Cast", [g.op("Gather", [mask_shape, g.init("one_idx", np.array(1, np.int64))], "mask/Width", axis=0)],
                     "mask/Total", to=TensorProto.INT32)

    tables = {key: (g.init(f"rotary.{key}.cos", c), g.init(f"rotary.{key}.sin", s))
              for key, (c, s) in rotary_tables(ad, opts.max_length).items()}

    head = module_weights(ad.lm_head)
    head_nbits = opts.weights("lm_head", [head[0]]) if opts.weights is not None else None
    tied = ad.lm_head.weight is ad.embed_tokens.weight
    if tied and head_nbits is not None and (head_nbits.zero_points is None or head_nbits.zero_points.dtype == np.uint8):
        x = quantized_embedding(g, head_nbits)  # the head's own codes: one copy of the table, not two
    else:
        x = g.op("Gather", [g.init("embed_tokens.weight", to_numpy(ad.embed_tokens.weight)), "input_ids"],
                 "embed/Gather", axis=0)
    scale = getattr(ad.embed_tokens, "embed_scale", None)  # Gemma scales the embedding by sqrt(width)
    if scale is not None:
        x = g.op("Mul", [x, g.init("embed.scale", np.array(float(scale), np.float32))], "embed/Scale")

    pending = None  # the last block's output, added to the residual stream by the next norm (SkipSimplified...)
    for i, layer in enumerate(layers):
        p = f"layers.{i}"
        h, x = residual_norm(g, x, pending, layer.attn_norm, f"{p}.attn_norm", layer, "attn")
        q_w, k_w, v_w = (module_weights(m) for m in (layer.q, layer.k, layer.v))
        heads, kv = layer.heads, layer.kv_heads
        packed = opts.pack_qkv and layer.q_norm is None
        if packed:
            qkv = [linear(g, h, f"{p}.qkv_proj", [q_w, k_w, v_w], opts), "", ""]
        else:
            qkv = [linear(g, h, f"{p}.{nm}_proj", [wb], opts) for nm, wb in zip("qkv", (q_w, k_w, v_w))]
            if layer.q_norm is not None:
                qkv[0] = qk_norm(g, qkv[0], layer.q_norm, heads, hd, f"{p}.q_norm")
                qkv[1] = qk_norm(g, qkv[1], layer.k_norm, kv, hd, f"{p}.k_norm")
        cos, sin = tables[layer.rope]
        window = layer.sliding_window
        attn, _, _ = g.op("GroupQueryAttention",
                          qkv + [f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total_len, cos, sin],
                          f"{p}/GroupQueryAttention", outputs=[f"{p}/attn", f"present.{i}.key", f"present.{i}.value"],
                          domain=MS, num_heads=heads, kv_num_heads=kv, scale=float(layer.attn_scale), do_rotary=1,
                          rotary_interleaved=0, local_window_size=window if window else -1)
        out = linear(g, attn, f"{p}.o_proj", [module_weights(layer.o)], opts)
        post = getattr(layer, "post_attn_norm", None)
        if post is not None:  # Gemma: the attention output is normalised before the residual add
            out = simple_norm(g, out, post, f"{p}.post_attn_norm")
        h, x = residual_norm(g, x, out, layer.mlp_norm, f"{p}.mlp_norm", layer, "mlp")
        pending = mlp(g, h, layer, p, opts)
        post = getattr(layer, "post_mlp_norm", None)
        if post is not None:
            pending = simple_norm(g, pending, post, f"{p}.post_mlp_norm")
    h, _ = residual_norm(g, x, pending, ad.final_norm_module, "final_norm", None, None, keep_sum=False)
    logits = linear(g, h, "lm_head", [head], opts, nbits=head_nbits)
    cap = getattr(ad.config, "final_logit_softcapping", None) if ad.family == "gemma3" else None
    if cap:
        c = g.init("softcap", np.array(float(cap), np.float32))
        logits = g.op("Mul", [g.op("Tanh", [g.op("Div", [logits, c], "softcap/Div")], "softcap/Tanh"), c], "softcap/Mul")
    g.op("Identity", [logits], "logits/Identity", outputs=["logits"])

    graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name="compressor")
    save_model(model, path)
    ops = {}
    for node in g.nodes:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"lowering": "fused", "ops": ops, "max_length": opts.max_length, "num_layers": n, "width": width}


def quantized_embedding(g: GraphBuilder, nbits) -> str:
    """Token embeddings read from the tied LM head's MatMulNBits codes (GatherBlockQuantized over the same
    initializers, reshaped), as onnxruntime-genai does: the table is stored once, at the head's precision."""
    data = g.op("Reshape", ["lm_head.qweight", g.init("embed.data_shape", np.array([nbits.n, -1], np.int64))],
                "embed/DataShape")
    scales = g.op("Reshape", ["lm_head.scales", g.init("embed.scale_shape", np.array([nbits.n, -1], np.int64))],
                  "embed/ScaleShape")
    inputs = [data, "input_ids", scales]
    if nbits.zero_points is None and nbits.bits == 8:  # its default zero point for 8 bits is not MatMulNBits' 128
        inputs.append(g.init("embed.zero_points", np.full((nbits.n, nbits.k_blocks), 128, np.uint8)))
    elif nbits.zero_points is not None:
        inputs.append(g.op("Reshape", ["lm_head.zero_points", "embed.scale_shape"], "embed/ZeroShape"))
    return g.op("GatherBlockQuantized", inputs, "embed/GatherBlockQuantized", domain=MS, bits=nbits.bits,
                block_size=nbits.block_size, gather_axis=0, quantize_axis=1)


def simple_norm(g: GraphBuilder, x: str, norm, name: str) -> str:
    gamma, eps = rms_norm_params(norm)
    return g.op("SimplifiedLayerNormalization", [x, g.init(f"{name}.gamma", gamma)], f"{name}/Norm", axis=-1,
                epsilon=eps, stash_type=1)


def residual_norm(g: GraphBuilder, x: str, pending: str | None, norm, name: str, layer, block: str | None,
                  keep_sum: bool = True) -> tuple[str, str]:
    """Add the pending block output to the residual stream and normalise: (normalised, new stream).

    One SkipSimplifiedLayerNormalization where the residual is the identity; a SliceGPT shortcut matrix on the
    residual path (per_layer slicing) is applied first, then an Add and a plain norm."""
    gamma, eps = rms_norm_params(norm)
    gamma_name = g.init(f"{name}.gamma", gamma)
    shortcut = getattr(layer.layer, f"{block}_shortcut", None) if layer is not None else None
    if shortcut is not None:
        w = to_numpy(shortcut.weight)
        x = g.op("MatMul", [x, g.init(f"{name}.shortcut_t", w.T)], f"{name}/Shortcut")
    if pending is None:
        return g.op("SimplifiedLayerNormalization", [x, gamma_name], f"{name}/Norm", axis=-1, epsilon=eps, stash_type=1), x
    if shortcut is not None:
        x = g.op("Add", [x, pending], f"{name}/Add")
        return g.op("SimplifiedLayerNormalization", [x, gamma_name], f"{name}/Norm", axis=-1, epsilon=eps, stash_type=1), x
    outs = g.op("SkipSimplifiedLayerNormalization", [pending, x, gamma_name], f"{name}/SkipNorm", domain=MS,
                outputs=[f"{name}/normed", "", "", f"{name}/sum"] if keep_sum else [f"{name}/normed"], epsilon=eps)
    return (outs[0], outs[3]) if keep_sum else (outs, x)


def mlp(g: GraphBuilder, h: str, layer, p: str, opts: LoweringOptions) -> str:
    """Gated MLP: gate and up in one matmul, split, act(gate) * up, down projection."""
    gate, up = module_weights(layer.gate), module_weights(layer.up)
    width = gate[0].shape[0]
    both = linear(g, h, f"{p}.gate_up_proj", [gate, up], opts)
    g_out, u_out = g.op("Split", [both, g.init(f"{p}.split", np.array([width, width], np.int64))], f"{p}/Split",
                        outputs=[f"{p}/gate", f"{p}/up"], axis=-1)
    act = activation(g, g_out, layer.act, f"{p}/act")
    prod = g.op("Mul", [act, u_out], f"{p}/GateMul")
    return linear(g, prod, f"{p}.down_proj", [module_weights(layer.fc_out)], opts)


SILUS = ("SiLU", "SiLUActivation")
TANH_GELUS = ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "GELUPytorchTanh")
GELUS = ("GELUActivation", "GELU")


def activation(g: GraphBuilder, x: str, act: torch.nn.Module, name: str) -> str:
    """The MLP's activation: SiLU as Sigmoid * x, tanh-approximated GELU as FastGelu, exact GELU as Gelu."""
    kind = type(act).__name__
    if kind in SILUS:
        return g.op("Mul", [x, g.op("Sigmoid", [x], f"{name}/Sigmoid")], f"{name}/Mul")
    if kind in TANH_GELUS:
        return g.op("FastGelu", [x], f"{name}/FastGelu", domain=MS)
    if kind in GELUS:
        return g.op("Gelu", [x], f"{name}/Gelu", domain=MS)
    raise NotImplementedError(f"the fused decoder lowering has no activation for {kind}")


def save_model(model: onnx.ModelProto, path: Path) -> None:
    size = sum(t.ByteSize() for t in model.graph.initializer)
    path = Path(path)
    if size > EXTERNAL_DATA_ABOVE:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
