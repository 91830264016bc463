"""Validation on held-out inputs: the compressed ONNX artifact against the original PyTorch model.

Statistical, because which tokens merge can flip between PyTorch and onnxruntime on near-ties: we report the
distribution of per-sample cosine similarities and the fraction of samples within tolerance, never one max diff.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from compressor.sources.inputs import feed_batches
from compressor.sources.photos import VALIDATION_DESCRIPTION
from compressor.validation.bars import at_least


@dataclass
class ValidationConfig:
    samples: int = 64
    min_cosine_mean: float = 0.95  # compressed ONNX vs original model, mean over samples
    min_cosine_p5: float = 0.85  # ... 5th percentile
    agreement_cosine: float = 0.999  # a sample agrees when ONNX vs compressed PyTorch cosine is at least this
    min_agreement: float = 0.95  # fraction of samples that must agree

    def to_json(self) -> dict:
        return asdict(self)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)).clip(min=1e-12)


def validate(handle, session, cfg: ValidationConfig, source: str | None = None, original=None, lowered=None) -> dict:
    """`original` is the uncompressed model's program (reloaded from the source); passes may have rewritten weights.

    `session` runs the graph that ships. When that graph was quantized, `lowered` is the FP32 graph before it: ONNX vs
    PyTorch agreement (an exactness check of the lowering) is measured there, cosine to dense on what ships.
    """
    from compressor.models import PAD

    names = [s.name for s in handle.input_specs()]
    dense, compressed = original or handle.program(dense=True), handle.program()
    exact = lowered or session
    ref, ours, onnx_out, shipped = [], [], [], []
    real_in = real_out = 0
    with torch.no_grad():
        for batch in feed_batches(handle, "validation", cfg.samples, source):
            args = tuple(torch.from_numpy(batch[n]) for n in names)
            ref.append(dense(*args).numpy())
            encoded = compressed.encode(*args) if hasattr(compressed, "encode") else None
            ours.append((encoded.pooled if encoded is not None else compressed(*args)).numpy())
            if encoded is not None:  # real tokens entering vs leaving (padding merges only into padding)
                real_in += int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(np.prod(batch[names[0]].shape[:1])) * handle.num_tokens
                real_out += int((encoded.kinds != PAD).sum())
            onnx_out.append(exact.run(None, batch)[0])
            if lowered is not None:
                shipped.append(session.run(None, batch)[0])
    ref, ours, onnx_out = (np.concatenate(x) for x in (ref, ours, onnx_out))
    shipped = np.concatenate(shipped) if lowered is not None else onnx_out
    to_dense = cosine_rows(shipped, ref)
    to_torch = cosine_rows(onnx_out, ours)
    result = {
        "samples": int(len(ref)),
        "data": source or ("held-out Wikipedia passages filling the compiled length" if handle.target.text
                           else VALIDATION_DESCRIPTION),
        "graph": "shipped, quantized (ONNX/PyTorch agreement on its FP32 graph)" if lowered is not None else "shipped",
        "cosine_to_dense_mean": float(to_dense.mean()),
        "cosine_to_dense_p5": float(np.percentile(to_dense, 5)),
        "cosine_to_dense_min": float(to_dense.min()),
        "onnx_vs_torch_agreement": float((to_torch >= cfg.agreement_cosine).mean()),
        "onnx_vs_torch_cosine_min": float(to_torch.min()),
        "thresholds": cfg.to_json(),
    }
    if lowered is not None:
        result["cosine_to_unquantized_mean"] = float(cosine_rows(shipped, onnx_out).mean())
    if real_in:
        result["real_tokens_per_sample"] = real_in / len(ref)
        result["real_tokens_merged_fraction"] = 1.0 - real_out / real_in
    failures, relax = [], {}
    if result["cosine_to_dense_mean"] < cfg.min_cosine_mean:
        failures.append(f"cosine to dense mean {result['cosine_to_dense_mean']:.4f} < min_cosine_mean {cfg.min_cosine_mean}")
        relax["min_cosine_mean"] = at_least(result["cosine_to_dense_mean"])
    if result["cosine_to_dense_p5"] < cfg.min_cosine_p5:
        failures.append(f"cosine to dense p5 {result['cosine_to_dense_p5']:.4f} < min_cosine_p5 {cfg.min_cosine_p5}")
        relax["min_cosine_p5"] = at_least(result["cosine_to_dense_p5"])
    if result["onnx_vs_torch_agreement"] < cfg.min_agreement:
        failures.append(f"ONNX/PyTorch agreement {result['onnx_vs_torch_agreement']:.3f} < min_agreement {cfg.min_agreement}")
        relax["min_agreement"] = at_least(result["onnx_vs_torch_agreement"])
    result["passed"] = not failures
    result["failures"] = failures
    if relax:
        result["relax"] = relax
    return result
