"""Deployment rewrites of an exported graph: onnxruntime's transformer fusions and INT8 quantization.

Both are applied after lowering and before validation, so the graph that is validated is the graph that ships. Our
graphs spell attention as matmul + softmax with an additive bias (padding mask, token-size log bias), which
onnxruntime's Attention fusion does not recognise: what did fuse is recorded, never assumed.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from compressor.errors import UsageError
from compressor.lower.onnx import quiet

QUANTIZE_MODES = ("none", "int8-dynamic")
# language models, fused lowering (lower_decoder.py): weight precision and how the weights get there
LOWERINGS = ("auto", "fused", "generic")
WEIGHT_MODES = ("fp32", "int4", "int8")
WEIGHT_METHODS = ("rtn", "hqq")
GGUF_MODES = ("carry", "round", "exact", "requantize")
MINIMUM_MODES = ("fp32", "int8")
DECODER_KEYS = {"lowering", "weights", "block_size", "symmetric", "method", "accuracy_level", "gguf", "keep_fp32",
                "requantize", "max_length", "minimums", "head_topk"}
OPTIONS_KEYS = {"fuse", "quantize", "per_channel", "buckets"} | DECODER_KEYS
MIN_BUCKET = 8
# onnxruntime.transformers.optimizer model types, by our adapters' model_type
FUSION_MODEL_TYPES = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert", "mpnet": "bert",
                      "dinov2": "vit", "vit": "vit", "deit": "vit", "clip_vision_model": "clip", "clip": "clip",
                      # decoders: GPT-2's python fusions are the ones that match a Llama-style block (RMSNorm ->
                      # SimplifiedLayerNormalization); attention stays as exported (rotary, cache concat)
                      "llama": "gpt2", "qwen2": "gpt2", "qwen3": "gpt2", "mistral": "gpt2", "phi3": "gpt2",
                      "gemma3_text": "gpt2"}


@dataclass
class ExportOptions:
    """The recipe's [export] deployment keys (the shape keys live beside them, in the handle)."""

    fuse: bool = False  # onnxruntime transformer optimizer (fused LayerNorm, Gelu, ... where patterns match)
    quantize: str = "none"  # "int8-dynamic": weights INT8, activations quantized per call (MatMul, Gemm, Attention)
    per_channel: bool = True  # one weight scale per output channel (keeps MiniLM's quality; per-tensor loses more)
    buckets: list[int] = field(default_factory=list)  # text: shorter static graphs beside seq_len (see buckets.py)
    # language models only
    # "fused": onnxruntime's fused operators (lower_decoder.py); "generic": the traced graph (where fuse / quantize
    # apply); "auto": fused unless fuse or quantize is set
    lowering: str = "auto"
    weights: str = "fp32"  # fused: "int4" / "int8" weight-only MatMulNBits
    block_size: int = 32  # weights quantized in blocks of this many input channels (power of two >= 16)
    symmetric: bool = True  # re-quantized weights without zero points (GGUF codes keep theirs)
    method: str = "rtn"  # onnxruntime's quantizer for weights that are re-quantized: round-to-nearest or HQQ
    accuracy_level: int = 0  # MatMulNBits compute: 0 as the inputs (float32), 4 = int8 activations (faster)
    # GGUF sources: "carry" the source's codes exactly where MatMulNBits can hold them (float block minimums as a
    # small exact side matmul); "round": the same codes with minimums rounded to integer zero points (fastest
    # kernels, not exact); "exact": carry, and refuse if any linear cannot be; "requantize": ignore the codes
    gguf: str = "carry"
    # how carried float block minimums are computed beside the 4-bit kernel: "fp32" (exact, a side matmul per linear)
    # or "int8" (inside the kernel as two 4-bit digits; ~8-bit minimums; no decode gain measured on 2 cores)
    minimums: str = "fp32"
    # > 0: the head's logits come from a 4-bit draft of it, with each position's top head_topk recomputed from the
    # head's own (8-bit / carried) codes; 0: the head runs at its own precision
    head_topk: int = 0
    keep_fp32: list[str] = field(default_factory=list)  # linears kept FP32: "lm_head", "down_proj", "layers.0", ...
    requantize: list[str] = field(default_factory=list)  # linears re-quantized at `weights` even where GGUF codes exist
    max_length: int = 4096  # positions a generation may reach (rotary rows, KV buffer length)

    @property
    def active(self) -> bool:
        return self.fuse or self.quantize != "none"

    def to_json(self) -> dict:
        return asdict(self)


def export_options(raw: dict | ExportOptions | None, where: str = "[export]") -> ExportOptions:
    """Typed, checked deployment options from a recipe's [export] table (shape keys are ignored here)."""
    if isinstance(raw, ExportOptions):
        return raw
    values = {k: v for k, v in (raw or {}).items() if k in OPTIONS_KEYS}
    for key in ("fuse", "per_channel"):
        if key in values and not isinstance(values[key], bool):
            raise UsageError(f"{where} {key} must be true or false, got {values[key]!r}")
    if "quantize" in values and values["quantize"] not in QUANTIZE_MODES:
        raise UsageError(f"{where} quantize must be one of {list(QUANTIZE_MODES)}, got {values['quantize']!r}")
    if "buckets" in values:
        values["buckets"] = _checked_buckets(values["buckets"], where)
    _check_decoder_options(values, where)
    return ExportOptions(**values)


def _check_decoder_options(values: dict, where: str) -> None:
    choices = {"lowering": LOWERINGS, "weights": WEIGHT_MODES, "method": WEIGHT_METHODS, "gguf": GGUF_MODES,
               "minimums": MINIMUM_MODES}
    for key, allowed in choices.items():
        if key in values and values[key] not in allowed:
            raise UsageError(f"{where} {key} must be one of {list(allowed)}, got {values[key]!r}")
    if "symmetric" in values and not isinstance(values["symmetric"], bool):
        raise UsageError(f"{where} symmetric must be true or false, got {values['symmetric']!r}")
    k = values.get("head_topk")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 1024):
        raise UsageError(f"{where} head_topk must be an integer from 0 (off) to 1024, got {k!r}")
    if (k or values.get("minimums", "fp32") != "fp32") and values.get("weights", "fp32") == "fp32":
        raise UsageError(f"{where} {'head_topk' if k else 'minimums'} shapes 4/8-bit weights; add weights = \"int4\" "
                         "(or \"int8\"), or remove it")
    for key, low in (("block_size", 16), ("max_length", 16)):
        v = values.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise UsageError(f"{where} {key} must be an integer >= {low}, got {v!r}")
    b = values.get("block_size")
    if b is not None and b & (b - 1):
        raise UsageError(f"{where} block_size must be a power of two (16, 32, 64, 128), got {b}")
    if values.get("accuracy_level", 0) not in (0, 1, 2, 3, 4) or isinstance(values.get("accuracy_level"), bool):
        raise UsageError(f"{where} accuracy_level must be 0 (float compute) or 1-4 (4: int8 activations), "
                         f"got {values['accuracy_level']!r}")
    for key in ("keep_fp32", "requantize"):
        names = values.get(key)
        if names is not None and not (isinstance(names, list) and all(isinstance(k, str) and k for k in names)):
            raise UsageError(f"{where} {key} must be a list of linear names, e.g. [\"lm_head\", \"down_proj\"]; got {names!r}")
    fused_only = [k for k in ("weights", "accuracy_level", "gguf", "keep_fp32", "requantize", "block_size", "method",
                              "symmetric", "minimums", "head_topk")
                  if k in values]
    if values.get("lowering") == "generic" and fused_only:
        raise UsageError(f"{where} {fused_only[0]} applies to the fused lowering; remove it or drop lowering = \"generic\"")
    if values.get("lowering") == "fused" and (values.get("quantize", "none") != "none" or values.get("fuse")):
        raise UsageError(f"{where} fuse and quantize rewrite the generic lowering's graph; with lowering = \"fused\" "
                         "use weights = \"int4\" or \"int8\" instead")
    if values.get("lowering") is None and (values.get("quantize", "none") != "none" or values.get("fuse")) and fused_only:
        raise UsageError(f"{where} {fused_only[0]} applies to the fused lowering, but fuse / quantize select the generic "
                         "one; remove fuse and quantize")


def fused_decoder(options: ExportOptions) -> bool:
    """Whether a language model takes the fused lowering (the default) or the traced generic graph."""
    if options.lowering == "auto":
        return not (options.fuse or options.quantize != "none")
    return options.lowering == "fused"


def _checked_buckets(buckets, where: str) -> list[int]:
    """A list of distinct sequence lengths >= MIN_BUCKET, ascending (the compiled seq_len is checked by the text target)."""
    if not isinstance(buckets, list) or not all(isinstance(b, int) and not isinstance(b, bool) for b in buckets):
        raise UsageError(f"{where} buckets must be a list of sequence lengths (integers), e.g. [32, 64]; got {buckets!r}")
    small = [b for b in buckets if b < MIN_BUCKET]
    if small:
        raise UsageError(f"{where} buckets must each be at least {MIN_BUCKET} tokens, got {small[0]}")
    repeated = sorted({b for b in buckets if buckets.count(b) > 1})
    if repeated:
        raise UsageError(f"{where} buckets lists {repeated[0]} more than once")
    return sorted(buckets)


# the optimizer and quantizer log shape-inference retries and advice on every call (some on the root logger)
ORT_LOGGERS = ("", "onnxruntime", "onnxruntime.transformers", "fusion_base", "onnx_model", "optimizer")


def fuse_transformer(src: Path, dst: Path, model_type: str, num_heads: int, hidden_size: int, ours: bool = True) -> dict:
    """onnxruntime's transformer optimizer on src, saved to dst; returns which fused operators it produced.

    For our graphs (`ours`): python fusions only (opt_level 0: the optimizer's own onnxruntime pre-pass leaves a graph
    that onnxruntime 1.32 then refuses to load at its extended level) and no ONNX shape inference, which fails on the
    dynamo graph and would otherwise block the SkipLayerNormalization fusion. Baselines get the defaults, as optimum."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    kind = FUSION_MODEL_TYPES.get(model_type)
    if kind is None:
        return {"model_type": None, "fused": {}, "note": f"no onnxruntime fusion model type for {model_type}"}
    settings = {}
    if ours:
        fusion = FusionOptions(kind)
        fusion.enable_shape_inference = False
        settings = {"opt_level": 0, "optimization_options": fusion}
    with quiet(*ORT_LOGGERS):
        model = optimize_model(str(src), model_type=kind, num_heads=num_heads, hidden_size=hidden_size, **settings)
        stats = model.get_fused_operator_statistics()
        model.save_model_to_file(str(dst))
    return {"model_type": kind, "fused": {op: int(n) for op, n in stats.items() if n}}


def quantize_int8_dynamic(src: Path, dst: Path, per_channel: bool = True, keep_float: tuple[str, ...] = ()) -> dict:
    """Weights to INT8 (symmetric), activations quantized at run time; only matmuls against a weight. Matmuls of the
    modules named in `keep_float` (paths in the exported program, e.g. "model.model.layers.0.mlp.down_proj") stay
    FP32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # fused contrib ops defeat ONNX shape inference: their outputs are float32, which the quantizer must be told
    extra = {"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT}
    excluded = nodes_of_modules(src, keep_float) if keep_float else []
    with quiet(*ORT_LOGGERS):
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                         nodes_to_exclude=excluded, extra_options=extra)
    record = {"mode": "int8-dynamic", "per_channel": per_channel, "quantized_ops": _count_ops(dst, "Integer", "Quant")}
    if keep_float:
        record["kept_float"] = {"modules": len(keep_float), "nodes": len(excluded), "why": KEEP_FLOAT_WHY}
    return record


KEEP_FLOAT_WHY = ("each block's MLP output projection (down_proj) reads the gated activation, whose outlier channels "
                  "per-tensor INT8 activations cannot hold: SmolLM2 held-out perplexity 1.59x dense with it in INT8, "
                  "1.05x with it kept FP32")


def keep_float_modules(adapter) -> tuple[str, ...]:
    """Language models keep each block's MLP output projection in FP32 (see KEEP_FLOAT_WHY): the modules to keep."""
    names = {id(m): n for n, m in adapter.model.named_modules()}
    return tuple(f"model.{names[id(layer.fc_out)]}" for layer in adapter.layers)


def nodes_of_modules(path: Path, modules: tuple[str, ...]) -> list[str]:
    """Names of the graph's nodes that the dynamo exporter attributes to these modules (its name_scopes record)."""
    import ast

    import onnx

    wanted, found = set(modules), []
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        if scopes and wanted.intersection(ast.literal_eval(scopes)):
            found.append(node.name)
    return found


def _count_ops(path: Path, *markers: str) -> dict:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if any(m in node.op_type for m in markers):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def lowered_path(model_path: Path) -> Path:
    """Scratch copy of a graph before quantization (model.onnx -> model.fp32.onnx): not shipped."""
    return model_path.with_name(model_path.stem + ".fp32.onnx")


def deploy_graph(model_path: Path, options: ExportOptions, adapter, step, keep_float: tuple[str, ...] = ()) -> tuple[dict, Path | None]:
    """Fusions and quantization rewrite the graph in place before validation (so what ships is what is validated).
    Returns the manifest's export record and, when quantized, the path of the FP32 graph before quantization (for
    the ONNX vs PyTorch agreement check, which INT8 rounding would otherwise fail); the caller removes that file."""
    if not options.active:
        return {"options": options.to_json(), "steps": [], "validated_graph": "as lowered"}, None
    quantized = options.quantize != "none"
    done = ", ".join(k for k, on in (("fusions", options.fuse), (options.quantize, quantized)) if on)
    step(f"optimizing {model_path.name}: {done}")
    # agreement is checked on the (fused) FP32 graph that quantization started from
    record = optimize_graph(model_path, options, adapter, lowered_path(model_path) if quantized else None, keep_float)
    record["validated_graph"] = "after " + " + ".join(record["steps"]) if record["steps"] else "as lowered"
    return record, lowered_path(model_path) if quantized else None


def optimize_graph(path: Path, options: ExportOptions, adapter, fp32_copy: Path | None = None,
                   keep_float: tuple[str, ...] = ()) -> dict:
    """Rewrite path (model.onnx) in place: fusions, then quantization (the FP32 graph it starts from is copied to
    `fp32_copy` if given). Returns the manifest's record of both."""
    record: dict = {"options": options.to_json(), "steps": []}
    if options.fuse:
        tmp = path.with_name(path.stem + ".fused.onnx")
        cfg = adapter.config
        record["fusion"] = fuse_transformer(path, tmp, cfg.model_type, cfg.num_attention_heads, cfg.hidden_size)
        if record["fusion"]["model_type"]:
            tmp.replace(path)
            record["steps"].append("fuse")
    if options.quantize == "int8-dynamic":
        if fp32_copy is not None:
            shutil.copy2(path, fp32_copy)
        tmp = path.with_name(path.stem + ".int8.onnx")
        record["quantization"] = quantize_int8_dynamic(path, tmp, options.per_channel, keep_float)
        tmp.replace(path)
        record["steps"].append("int8-dynamic")
    return record
