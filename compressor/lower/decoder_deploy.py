"""The fused decoder artifact: FP32 lowering, then 4/8-bit weights (GGUF codes carried exactly where the format allows,
the rest re-quantized by onnxruntime's own quantizers), with a per-linear record of where each weight came from.

The FP32 graph is kept beside the shipped one for validation (ONNX vs PyTorch agreement), as with the generic
lowering's INT8; the caller removes it before publishing.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from compressor.errors import UsageError
from compressor.lower.fused_decoder import LoweringOptions, lower_decoder, to_numpy
from compressor.lower.nbits import NBitsWeight, pack_zero_points, quantize_weight
from compressor.lower.optimize import ExportOptions, lowered_path

# the lowering stacks these linears into one matmul: their parts, in order
PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def linear_modules(ad) -> dict[str, object]:
    """Every linear the lowering emits, by the name it gives it (layers.i.q_proj ..., lm_head)."""
    out = {}
    for i, layer in enumerate(ad.layers):
        for name, mod in (("q_proj", layer.q), ("k_proj", layer.k), ("v_proj", layer.v), ("o_proj", layer.o),
                          ("gate_proj", layer.gate), ("up_proj", layer.up), ("down_proj", layer.fc_out)):
            out[f"layers.{i}.{name}"] = mod
    out["lm_head"] = ad.lm_head
    return out


def rounded_zero_points(w: NBitsWeight) -> NBitsWeight:
    """A carrier's float zero points (GGUF Q4_1 / Q4_K minimums) rounded to the nearest integer code, packed as
    MatMulNBits' uint8 zero points: the kernels' fast path, at an error of up to half a step per block."""
    if w.zero_points is None or w.zero_points.dtype == np.uint8:
        return w
    top = 2 ** w.bits - 1
    zp = np.clip(np.round(w.zero_points.reshape(w.n, -1)), 0, top)
    return NBitsWeight(w.bits, w.block_size, w.n, w.k, w.packed, w.scales, pack_zero_points(zp, w.bits),
                       w.origin.replace("(exact)", "(zero points rounded)"))


def concat_rows(weights: list[NBitsWeight]) -> NBitsWeight | None:
    """Stack carriers along the output rows (exact); None when their formats differ (bits, block, zero-point kind)."""
    first = weights[0]
    kinds = {(w.bits, w.block_size, w.k, None if w.zero_points is None else w.zero_points.dtype.str) for w in weights}
    if len(kinds) != 1:
        return None
    if len(weights) == 1:
        return first
    zp = None if first.zero_points is None else np.concatenate([w.zero_points for w in weights])
    return NBitsWeight(first.bits, first.block_size, sum(w.n for w in weights), first.k,
                       np.concatenate([w.packed for w in weights]), np.concatenate([w.scales for w in weights]), zp,
                       first.origin if len({w.origin for w in weights}) == 1 else "mixed")


class WeightPlan:
    """Per linear: GGUF codes carried exactly, re-quantized at the chosen precision, or kept FP32 (keep_fp32)."""

    def __init__(self, handle, options: ExportOptions):
        self.options = options
        self.bits = {"int4": 4, "int8": 8}[options.weights]
        self.modules = linear_modules(handle.adapter)
        self.carried: dict[str, NBitsWeight] = {}
        self.gguf = None
        if options.gguf != "requantize":
            from compressor.sources.gguf import gguf_for
            from compressor.sources.gguf_codes import match_linears

            self.gguf = gguf_for(handle.adapter.folder)
            if self.gguf is not None:
                named = {name: to_numpy(m.weight) for name, m in self.modules.items()}
                self.carried = match_linears(self.gguf, named)
                self.carried = {n: w for n, w in self.carried.items() if not self.matches(n, options.requantize)}
                if options.gguf == "round":  # speed first: integer zero points only, on the fast kernels
                    self.carried = {n: rounded_zero_points(w) for n, w in self.carried.items()}
        if options.gguf == "exact":
            self._check_exact()
        for name, mod in self.modules.items():
            k = mod.weight.shape[1]
            if name not in self.carried and not self.kept(name) and k % options.block_size:
                raise UsageError(f"[export] block_size = {options.block_size} does not divide {name}'s input width {k}; "
                                 f"choose a power of two that divides it, or keep_fp32 = [\"{name.split('.')[-1]}\"]")
        self.origins: dict[str, str] = {}

    def _check_exact(self) -> None:
        if self.gguf is None:
            raise UsageError("[export] gguf = \"exact\" needs a GGUF source; this model has none (use gguf = \"carry\")")
        missing = [n for n in self.modules if n not in self.carried and not self.kept(n)]
        if missing:
            raise UsageError(f"[export] gguf = \"exact\": {len(missing)} linears (first {missing[0]}) are not the source's "
                             "GGUF codes (a pass changed them, or their GGUF type has no exact MatMulNBits form); use "
                             "gguf = \"carry\" to re-quantize those")

    @staticmethod
    def matches(name: str, patterns: list[str]) -> bool:
        """A linear named by a pattern: its whole name, one of its parts ("down_proj"), or a prefix ("layers.3")."""
        return any(p == name or p in name.split(".") or name.startswith(p + ".") for p in patterns)

    def kept(self, name: str) -> bool:
        return self.matches(name, self.options.keep_fp32)

    def __call__(self, name: str, parts: list[np.ndarray]) -> NBitsWeight | None:
        prefix, _, last = name.rpartition(".")
        names = [f"{prefix}.{p}" if prefix else p for p in PARTS.get(last, (last,))]
        if any(self.kept(n) for n in names):
            self.origins.update(dict.fromkeys(names, "fp32 (kept)"))
            return None
        pieces = [self.carried.get(n) or self.requantize(w) for n, w in zip(names, parts)]
        stacked = concat_rows(pieces)
        if stacked is None:  # parts in different formats (one carried, one not): re-quantize the stack as one
            stacked = self.requantize(np.concatenate(parts))
            self.origins.update(dict.fromkeys(names, stacked.origin))
        else:
            self.origins.update((n, p.origin) for n, p in zip(names, pieces))
        return stacked

    def requantize(self, w: np.ndarray) -> NBitsWeight:
        o = self.options
        return quantize_weight(w, self.bits, o.block_size, o.symmetric, o.method)

    def record(self) -> dict:
        return {"bits": self.bits, "block_size": self.options.block_size, "method": self.options.method,
                "symmetric": self.options.symmetric, "accuracy_level": self.options.accuracy_level,
                "gguf_source": self.gguf.name if self.gguf is not None else None,
                "origins": dict(Counter(self.origins.values())), "per_linear": self.origins,
                "kept_fp32": sorted(n for n, o in self.origins.items() if o.startswith("fp32"))}


GENAI_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral", "phi3": "phi3",
               "gemma3_text": "gemma3_text"}


def write_genai_config(ad, folder: Path, options: ExportOptions, model_file: str, kv_policy: dict | None = None) -> dict:
    """genai_config.json, so onnxruntime_genai.Model(artifact) runs the graph with its own generator (the graph's
    inputs and outputs are its decoder convention). Its config holds one key/value head count for every layer, so an
    artifact whose blocks differ there (width_prune) gets none, and the record says why."""
    import json

    kv = sorted(set(ad.kv_heads))
    heads = sorted({layer.heads for layer in ad.layers})
    model_type = ad.config.model_type
    if kv_policy and kv_policy["scores"]:
        return {"written": False, "why": f"the graph returns attention probabilities for the runtime's {kv_policy['policy']} "
                                         "KV policy, which onnxruntime-genai's generator does not read"}
    if len(kv) > 1 or len(heads) > 1 or model_type not in GENAI_TYPES:
        why = (f"onnxruntime-genai has no decoder type for {model_type}" if model_type not in GENAI_TYPES else
               "blocks have different head counts, which genai_config.json cannot express")
        return {"written": False, "why": why}
    c = ad.config
    eos = ad.preprocess_config({})["eos_token_ids"]  # the runtime's own list
    config = {
        "model": {
            "bos_token_id": c.bos_token_id, "context_length": options.max_length,
            "eos_token_id": eos,
            "pad_token_id": int(c.pad_token_id if c.pad_token_id is not None else eos[0]),
            "type": GENAI_TYPES[model_type], "vocab_size": c.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file, "head_size": ad.head_dim, "hidden_size": ad.embed_tokens.weight.shape[1],
                "num_attention_heads": heads[0], "num_hidden_layers": len(ad.layers), "num_key_value_heads": kv[0],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value",
                           **({"position_ids": "position_ids"} if kv_policy else {})},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "max_length": options.max_length, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True, "temperature": 1.0, "top_k": 1,
                   "top_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0, "early_stopping": True,
                   "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }
    (folder / GENAI_CONFIG).write_text(json.dumps(config, indent=2))
    return {"written": True, "file": GENAI_CONFIG}


GENAI_CONFIG = "genai_config.json"


def mark_fused(manifest: dict, options: ExportOptions) -> None:
    """What the runtime needs to know of a fused graph: one shared KV buffer per layer, right-padded rows, and how
    many positions the rotary tables hold."""
    window = manifest["model"].get("sliding_window")  # one for every block, a list per block, or absent
    widest = max([w for w in (window if isinstance(window, list) else [window]) if w] or [0])
    manifest["preprocess"].update(kv_cache="shared", max_length=options.max_length, prefill_chunk=PREFILL_CHUNK,
                                  min_kv_slots=min(options.max_length, widest))  # GQA wants room for its window


PREFILL_CHUNK = 256  # prompt tokens fed per call when prefilling long prompts


def policy_io(kv_policy: dict | None) -> dict:
    """The graph inputs and outputs a KV-cache policy needs (passes/kv_cache.py): none without one."""
    if not kv_policy:
        return {}
    return {"position_ids": True, "attention_probs": bool(kv_policy["scores"])}


def lowering_options(options: ExportOptions, plan: WeightPlan, kv_policy: dict | None = None) -> LoweringOptions:
    """The quantized graph's lowering: the plan's weights, the [export] speed options (minimums, head_topk)."""
    def head_draft(head: NBitsWeight) -> NBitsWeight:  # 4-bit draft of the head, from the values it ships
        return quantize_weight(head.dequantize(), 4, options.block_size, True, "rtn")

    return LoweringOptions(options.max_length, weights=plan, accuracy_level=options.accuracy_level,
                           minimums=options.minimums, head_topk=options.head_topk, head_draft=head_draft,
                           **policy_io(kv_policy))


def deploy_fused_decoder(handle, model_path: Path, options: ExportOptions, step) -> tuple[dict, Path | None]:
    """Write the fused graph to model_path (with 4/8-bit weights if asked); returns the manifest's export record and
    the FP32 graph's path when the shipped graph was quantized (for validation; the caller removes it)."""
    ad = handle.adapter
    quantized = options.weights != "fp32"
    plan = WeightPlan(handle, options) if quantized else None  # refusals (block size, exactness) before any work
    fp32_path = lowered_path(model_path) if quantized else model_path
    step("lowering the decoder to onnxruntime's fused operators")
    policy = getattr(handle, "kv_policy", None)
    record = {"options": options.to_json(),
              "lowering": lower_decoder(ad, fp32_path, LoweringOptions(options.max_length, **policy_io(policy)))}
    if quantized:
        step(f"{options.weights} weights (MatMulNBits)")
        record["lowering"] = lower_decoder(ad, model_path, lowering_options(options, plan, policy))
        record["weights"] = plan.record()
    record["validated_graph"] = "fused" + (f", {options.weights} weights" if quantized else "")
    record["genai"] = write_genai_config(ad, model_path.parent, options, model_path.name, policy)
    return record, fp32_path if quantized else None
