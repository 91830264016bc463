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

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from compressor.lower.graph_builder import MS, GraphBuilder
from compressor.models import DecoderAdapter
from compressor.lower.nbits import NBitsWeight
from compressor.lower.nbits_graph import emit_matmul_nbits

OPSET = 21
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
class LoweringOptions:
    """What the lowering emits. `weights(name, W)` returns an NBitsWeight for a linear to run as MatMulNBits, or None
    to keep it as an FP32 MatMul; `max_length` bounds positions (the rotary tables' rows, the KV buffers)."""

    max_length: int = 4096
    weights: Callable | None = None
    accuracy_level: int = 0
    pack_qkv: bool = True
    # float block minimums (GGUF Q4_1 / Q4_K), see nbits_graph.py: "fp32" side matmul (exact) or "int8" digits
    minimums: str = "fp32"
    # > 0: the head runs as `head_draft(W)` (a 4-bit NBitsWeight) for every logit, and the top head_topk logits of
    # each position are recomputed from the head's own weights (exact where they matter: argmax, softmax mass)
    head_topk: int = 0
    head_draft: Callable | None = None
    # a KV-cache policy (passes/kv_cache.py): rotary positions from a position_ids input (a kept token keeps its
    # position in any slot), and for h2o / snapkv each layer's attention probabilities as outputs (output_qk)
    position_ids: bool = False
    attention_probs: bool = False


def linear(g: GraphBuilder, x: str, name: str, parts: list[tuple[np.ndarray, np.ndarray | None]],
           opts: LoweringOptions, nbits=None) -> str:
    """y = x @ W.T + b for W the rows of `parts` stacked (q, k, v in one matmul; gate and up in one), as an FP32
    MatMul or a MatMulNBits (the NBitsWeight given, or the one opts.weights returns for these parts)."""
    bias = stacked_bias(parts)
    if nbits is None and opts.weights is not None:
        nbits = opts.weights(name, [w for w, _ in parts])
    if nbits is None:
        weight = stacked_weight(parts)  # stacked only where it ships as FP32
        y = g.op("MatMul", [x, g.init(f"{name}.weight_t", weight.T)], f"{name}/MatMul")
        if bias is not None:
            y = g.op("Add", [y, g.init(f"{name}.bias", bias)], f"{name}/Add")
        return y
    return emit_matmul_nbits(g, x, name, nbits, opts.accuracy_level, bias, opts.minimums)


def module_weights(lin: torch.nn.Linear) -> tuple[np.ndarray, np.ndarray | None]:
    return to_numpy(lin.weight), (to_numpy(lin.bias) if lin.bias is not None else None)


def stacked_weight(parts: list[tuple[np.ndarray, np.ndarray | None]]) -> np.ndarray:
    return parts[0][0] if len(parts) == 1 else np.concatenate([w for w, _ in parts])


def stacked_bias(parts: list[tuple[np.ndarray, np.ndarray | None]]) -> np.ndarray | None:
    """The parts' biases end to end (zeros for a part without one); None if no part has one."""
    if all(b is None for _, b in parts):
        return None
    return np.concatenate([b if b is not None else np.zeros(w.shape[0], np.float32) for w, b in parts])


def rotary_tables(ad: DecoderAdapter, max_length: int) -> dict:
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


def fused_refusal(ad: DecoderAdapter) -> str | None:
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


def lower_decoder(ad: DecoderAdapter, path: Path, opts: LoweringOptions | None = None) -> dict:
    """Write the fused decoder graph of adapter `ad` (any DecoderAdapter family) to `path`; returns what it did."""
    opts = opts or LoweringOptions()
    g = GraphBuilder()
    layers, hd = ad.layers, ad.head_dim
    n = len(layers)
    vocab = ad.config.vocab_size
    width = ad.embed_tokens.weight.shape[1]

    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])]
    if opts.position_ids:
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"]))
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
    gatherable = head_nbits is not None and (head_nbits.zero_points is None or head_nbits.zero_points.dtype == np.uint8)
    topk = bool(opts.head_topk) and gatherable and head[1] is None  # (no family we lower has a head bias)
    if topk:  # the head's codes are read by gathers only (embedding, top-k rows)
        g.init("lm_head.qweight", head_nbits.packed)
        g.init("lm_head.scales", head_nbits.scales)
        if head_nbits.zero_points is not None:
            g.init("lm_head.zero_points", head_nbits.zero_points)
    if tied and gatherable:
        x = quantized_embedding(g, head_nbits)  # the head's own codes: one copy of the table, not two
    else:
        x = g.op("Gather", [g.init("embed_tokens.weight", to_numpy(ad.embed_tokens.weight)), "input_ids"],
                 "embed/Gather", axis=0)
    scale = ad.embed_scale  # Gemma scales the embedding by sqrt(width)
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
        gqa_in = qkv + [f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total_len, cos, sin]
        gqa_out = [f"{p}/attn", f"present.{i}.key", f"present.{i}.value"]
        extra = {}
        if opts.position_ids:
            gqa_in.append("position_ids")  # input 9
        if opts.attention_probs:
            gqa_out.append(f"attention_probs.{i}")  # output 3: (B, heads, S, total) softmax probabilities
            extra["qk_output"] = 2
            outputs.append(helper.make_tensor_value_info(f"attention_probs.{i}", TensorProto.FLOAT,
                                                         ["batch", heads, "sequence", "total"]))
        attn = g.op("GroupQueryAttention", gqa_in, f"{p}/GroupQueryAttention", outputs=gqa_out, domain=MS,
                    num_heads=heads, kv_num_heads=kv, scale=float(layer.attn_scale), do_rotary=1,
                    rotary_interleaved=0, local_window_size=window if window else -1, **extra)[0]
        out = linear(g, attn, f"{p}.o_proj", [module_weights(layer.o)], opts)
        post = layer.post_attn_norm
        if post is not None:  # Gemma: the attention output is normalised before the residual add
            out = simple_norm(g, out, post, f"{p}.post_attn_norm")
        h, x = residual_norm(g, x, out, layer.mlp_norm, f"{p}.mlp_norm", layer, "mlp")
        pending = mlp(g, h, layer, p, opts)
        post = layer.post_mlp_norm
        if post is not None:
            pending = simple_norm(g, pending, post, f"{p}.post_mlp_norm")
    h, _ = residual_norm(g, x, pending, ad.final_norm_module, "final_norm", None, None, keep_sum=False)
    if topk:
        logits = topk_head(g, h, head_nbits, opts)
    else:
        logits = linear(g, h, "lm_head", [head], opts, nbits=head_nbits)
    cap = ad.logit_softcap
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
    out = {"lowering": "fused", "ops": ops, "max_length": opts.max_length, "num_layers": n, "width": width}
    if opts.position_ids:
        out["kv_policy_io"] = {"position_ids": True, "attention_probs": opts.attention_probs}
    if opts.head_topk:
        out["head_topk"] = opts.head_topk if topk else ("not applied: the head ships as FP32, with float zero points "
                                                        "(GatherBlockQuantized cannot read them) or with a bias")
    return out


def topk_head(g: GraphBuilder, h: str, head: NBitsWeight, opts: LoweringOptions) -> str:
    """Logits from a 4-bit draft of the head, with each position's top k recomputed from the head's own codes.

    The head is the largest single matmul of a small model (SmolLM2: 576 x 49152, 1.4 ms per token at 8 bits, 0.7
    at 4). The draft ranks the vocabulary; the k best rows are gathered at full precision (GatherBlockQuantized over
    the head's table, the one the embedding reads) and dotted with the hidden state in FP32, then written over the
    draft's values. Greedy tokens and the softmax mass come from exact logits; only the tail keeps the draft's."""
    draft = opts.head_draft(head)
    approx = emit_matmul_nbits(g, h, "lm_head_draft", draft, opts.accuracy_level)
    _, idx = g.op("TopK", [approx, g.init("lm_head.topk", np.array([opts.head_topk], np.int64))], "lm_head/TopK",
                  outputs=["lm_head/top_values", "lm_head/top_ids"], axis=-1)
    rows = gather_rows(g, head, idx, "lm_head/Rows")  # (B, S, k, D)
    hx = g.op("Unsqueeze", [h, g.init("lm_head.row_axis", np.array([2], np.int64))], "lm_head/Unsqueeze")
    exact = g.op("ReduceSum", [g.op("Mul", [rows, hx], "lm_head/RowMul"), g.init("lm_head.dot_axis", np.array([-1], np.int64))],
                 "lm_head/Dot", keepdims=0)
    return g.op("ScatterElements", [approx, idx, exact], "lm_head/Refine", axis=-1)


def gather_rows(g: GraphBuilder, nbits: NBitsWeight, ids: str, name: str) -> str:
    """Rows `ids` of the head's table, dequantized: GatherBlockQuantized over lm_head.qweight / scales / zero
    points, reshaped to (n, k) codes and (n, k_blocks) scales (shared with quantized_embedding)."""
    if "table" not in g.memo:
        data = g.op("Reshape", ["lm_head.qweight", g.init("embed.data_shape", np.array([nbits.n, -1], np.int64))],
                    "embed/DataShape")
        scales = g.op("Reshape", ["lm_head.scales", g.init("embed.scale_shape", np.array([nbits.n, -1], np.int64))],
                      "embed/ScaleShape")
        zp = None
        if nbits.zero_points is None and nbits.bits == 8:  # its default zero point for 8 bits is not MatMulNBits' 128
            zp = g.init("embed.zero_points", np.full((nbits.n, nbits.k_blocks), 128, np.uint8))
        elif nbits.zero_points is not None:
            zp = g.op("Reshape", ["lm_head.zero_points", "embed.scale_shape"], "embed/ZeroShape")
        g.memo["table"] = (data, scales, zp)
    data, scales, zp = g.memo["table"]
    inputs = [data, ids, scales] + ([zp] if zp else [])
    return g.op("GatherBlockQuantized", inputs, name, domain=MS, bits=nbits.bits, block_size=nbits.block_size,
                gather_axis=0, quantize_axis=1)


def quantized_embedding(g: GraphBuilder, nbits) -> str:
    """Token embeddings read from the tied LM head's MatMulNBits codes (GatherBlockQuantized over the same
    initializers, reshaped), as onnxruntime-genai does: the table is stored once, at the head's precision."""
    return gather_rows(g, nbits, "input_ids", "embed/GatherBlockQuantized")


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
    shortcut = layer.shortcut(block) if layer is not None else None
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
