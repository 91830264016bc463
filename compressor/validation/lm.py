"""Validation of language-model artifacts on held-out Wikipedia text (never the calibration articles).

Perplexity of the ONNX artifact against the compressed PyTorch model (they must agree to about 3 digits) and
against the original model (bounded increase), and greedy continuations of held-out prompts, ONNX vs PyTorch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from compressor.program.decoder import prefill_inputs
from compressor.sources.lm_data import held_out_windows, torch_perplexity
from compressor.sources.wiki import wiki_split


@dataclass
class LMValidationConfig:
    perplexity_windows: int = 8  # held-out windows of window_len tokens
    window_len: int = 512
    max_perplexity_ratio: float = 1.5  # compressed ONNX perplexity / original model perplexity
    max_onnx_gap: float = 0.001  # |ONNX - PyTorch| / PyTorch perplexity
    greedy_prompts: int = 4
    greedy_tokens: int = 16
    min_greedy_agreement: float = 0.75  # fraction of prompts whose ONNX greedy continuation equals PyTorch's
    # the same for the shipped graph when it is quantized (int8 activations, rounded codes): 0 = reported only
    min_quantized_agreement: float = 0.0
    # with a KV-cache policy (passes/kv_cache.py): a held-out prompt of kv_prompt_len tokens (capped by max_length),
    # the next kv_continuation tokens scored under the policy and under the full cache; 0 = reported only
    max_kv_perplexity_ratio: float = 0.0
    kv_prompt_len: int = 2048
    kv_continuation: int = 128
    kv_windows: int = 1

    def to_json(self) -> dict:
        return asdict(self)


def program_logits(program, adapter):
    def fn(ids: torch.Tensor) -> torch.Tensor:
        return program(*prefill_inputs(adapter, ids))[0]
    return fn


def held_out_prompts(count: int) -> list[str]:
    """The first sentence of each held-out article."""
    _, held_out = wiki_split()
    prompts = []
    for text in held_out:
        first = text.split("\n")[0]
        words = first.split()[:12]
        if len(words) >= 6:
            prompts.append(" ".join(words))
        if len(prompts) == count:
            break
    return prompts


def torch_greedy(program, adapter, ids: list[int], steps: int, eos: set[int]) -> list[int]:
    seq = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = program(*prefill_inputs(adapter, torch.tensor([seq])))[0]
            token = int(logits[0, -1].argmax())
            if token in eos:
                break
            out.append(token)
            seq.append(token)
    return out


def validate_lm(handle, lm, reference_adapter, cfg: LMValidationConfig, lowered=None) -> dict:
    """`lm` is the runtime CausalLM over the freshly written ONNX; `reference_adapter` holds the original model.

    When the shipped graph was quantized, `lowered` runs its FP32 graph from before: the ONNX vs PyTorch checks
    (perplexity gap, greedy agreement) are made on it, the perplexity bound on the shipped graph, and the quantized
    graph's own greedy agreement is reported beside them."""
    from compressor.program.decoder import DecoderProgram

    windows = held_out_windows(handle.adapter.tokenizer_file, cfg.window_len, cfg.perplexity_windows)
    ours = handle.program()
    ppl_dense = torch_perplexity(program_logits(DecoderProgram(reference_adapter), reference_adapter), windows)
    ppl_torch = torch_perplexity(program_logits(ours, handle.adapter), windows)
    exact = lowered or lm
    ppl_onnx = lm.perplexity(windows)
    ppl_exact = exact.perplexity(windows) if lowered else ppl_onnx
    agree, agree_shipped = [], []
    for prompt in held_out_prompts(cfg.greedy_prompts):
        ids = lm.encode(prompt)
        expected = torch_greedy(ours, handle.adapter, ids, cfg.greedy_tokens, lm.eos_token_ids)
        agree.append(exact.generate(ids, max_new_tokens=cfg.greedy_tokens) == expected)
        if lowered:
            agree_shipped.append(lm.generate(ids, max_new_tokens=cfg.greedy_tokens) == expected)
    result = {
        "windows": int(len(windows)),
        "window_len": cfg.window_len,
        "data": "held-out Wikipedia articles (gensim test data, last 20% in file order)",
        "perplexity_dense_torch": ppl_dense,
        "perplexity_torch": ppl_torch,
        "perplexity_onnx": ppl_onnx,
        "perplexity_ratio": ppl_onnx / ppl_dense,
        "onnx_gap": abs(ppl_exact - ppl_torch) / ppl_torch,
        "greedy_agreement": float(np.mean(agree)) if agree else 1.0,
        "thresholds": cfg.to_json(),
        "graph": "shipped, quantized (ONNX/PyTorch gap and greedy agreement on its FP32 graph)" if lowered else "shipped",
    }
    if lowered:
        result["perplexity_onnx_fp32"] = ppl_exact
        result["greedy_agreement_quantized"] = float(np.mean(agree_shipped)) if agree_shipped else 1.0
    from compressor.validation.bars import at_least, at_most

    failures, relax = [], {}
    if result["perplexity_ratio"] > cfg.max_perplexity_ratio:
        failures.append(f"perplexity {ppl_onnx:.3f} is {result['perplexity_ratio']:.2f}x dense {ppl_dense:.3f} "
                        f"> max_perplexity_ratio {cfg.max_perplexity_ratio}")
        relax["max_perplexity_ratio"] = at_most(result["perplexity_ratio"])
    if result["onnx_gap"] > cfg.max_onnx_gap:
        failures.append(f"ONNX perplexity {ppl_exact:.4f} differs from PyTorch {ppl_torch:.4f} by {result['onnx_gap']:.2e} "
                        f"> max_onnx_gap {cfg.max_onnx_gap}")
        relax["max_onnx_gap"] = at_most(result["onnx_gap"])
    if result["greedy_agreement"] < cfg.min_greedy_agreement:
        failures.append(f"greedy agreement {result['greedy_agreement']:.2f} < min_greedy_agreement {cfg.min_greedy_agreement}")
        relax["min_greedy_agreement"] = at_least(result["greedy_agreement"])
    if lowered and result["greedy_agreement_quantized"] < cfg.min_quantized_agreement:
        failures.append(f"the quantized graph's greedy agreement {result['greedy_agreement_quantized']:.2f} < "
                        f"min_quantized_agreement {cfg.min_quantized_agreement} (or try accuracy_level = 0)")
        relax["min_quantized_agreement"] = at_least(result["greedy_agreement_quantized"])
    if lm.kv_policy is not None:
        from compressor.validation.kv import validate_kv_policy

        kv = result["kv_policy"] = validate_kv_policy(lm, handle.adapter.tokenizer_file, cfg)
        if "failure" in kv:
            failures.append(kv.pop("failure"))
            relax["max_kv_perplexity_ratio"] = at_most(kv["perplexity_ratio"])
    if relax:
        result["relax"] = relax
    result["passed"] = not failures
    result["failures"] = failures
    return result
