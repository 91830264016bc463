"""Validation on held-out inputs: the compressed ONNX artifact against the original PyTorch model.

Statistical, because which tokens merge can flip between PyTorch and onnxruntime on near-ties: we report the
distribution of per-sample cosine similarities and the fraction of samples within tolerance, never one max diff.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from compressor.sources.inputs import feed_batches
from compressor.sources.photos import VALIDATION_DESCRIPTION


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
        "data": source or ("held-out Wikipedia passages filling the compiled length" if handle.adapter.modality == "text"
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


def at_least(measured: float) -> float:
    """A lower bar the measured value meets: rounded down to 3 decimals (cosines, agreements, fractions)."""
    return math.floor(measured * 1000) / 1000


def at_most(measured: float) -> float:
    """An upper bar the measured value meets: rounded up to 3 significant digits (ratios, gaps, increases)."""
    if measured <= 0:
        return 0.0
    step = 10.0 ** (math.floor(math.log10(measured)) - 2)
    bar = float(f"{math.ceil(measured / step - 1e-9) * step:.3g}")
    return bar if bar >= measured else float(f"{bar + step:.3g}")


# What to compress less: by the passes' own option names (compress passes lists them all).
COMPRESS_LESS = "compress less (a smaller r or reduction, fewer blocks, a lower sparsity, flops or params closer to 1)"


def failure_message(result: dict) -> str:
    """The one line a failed validation ends in: each measured value against its bar (by key), then the two ways on:
    compress less, or relax the bar from the command line or the recipe, with bars the measured values meet."""
    relax = dict(result.get("relax") or speech_relax(result))
    if relax:
        flags = " ".join(f"--validate {k}={v}" for k, v in relax.items())
        table = ", ".join(f"{k} = {v}" for k, v in relax.items())
        relaxed = f"relax the bar: {flags} (in a recipe: [validation] {table})"
    else:
        relaxed = "relax the bar: --validate KEY=VALUE (in a recipe: [validation] KEY = VALUE)"
    return f"validation failed, nothing published: {'; '.join(result['failures'])}; to pass, {COMPRESS_LESS} or {relaxed}"


def speech_relax(result: dict) -> dict:
    """Bars a speech validation's measured values meet (validate_speech reports values and config, not keys)."""
    cfg, relax = result.get("config") or {}, {}
    if "export_agreement" in result and result["export_agreement"] < cfg.get("min_export_agreement", 0.0):
        relax["min_export_agreement"] = at_least(result["export_agreement"])
    if "wer_compressed" in result:
        rise = result["wer_compressed"] - result["wer_dense"]
        if rise > cfg.get("max_wer_increase", float("inf")):
            relax["max_wer_increase"] = at_most(rise)
    return relax


def _all_keys() -> set[str]:
    from dataclasses import fields

    from compressor.export.validate_lm import LMValidationConfig

    from compressor.export.speech import SpeechValidation

    return ({f.name for f in fields(ValidationConfig)} | {f.name for f in fields(LMValidationConfig)}
            | {f.name for f in fields(SpeechValidation)})


VALIDATION_KEYS = _all_keys()


def validation_config(modality: str, raw: dict | None):
    """The typed thresholds for this kind of model from a recipe's [validation] table (and --validate overrides)."""
    from dataclasses import fields

    from compressor.errors import UsageError
    from compressor.export.validate_lm import LMValidationConfig

    from compressor.export.speech import SpeechValidation

    cls = {"causal_lm": LMValidationConfig, "audio": SpeechValidation}.get(modality, ValidationConfig)
    if isinstance(raw, cls):
        return raw
    raw = dict(raw or {})
    allowed = {f.name: f.type for f in fields(cls)}
    wrong = set(raw) - set(allowed)
    if wrong:
        raise UsageError(f"[validation] key(s) {sorted(wrong)} do not apply to a {modality} model (use {sorted(allowed)})")
    values = {}
    for key, value in raw.items():
        values[key] = typed_validation_value(key, value, type(getattr(cls, key)))
    return cls(**values)


COUNTS_MAY_BE_ZERO = {"greedy_prompts", "greedy_tokens"}  # 0: no greedy check


def typed_validation_value(key: str, value, want: type, where: str = "[validation]"):
    """A threshold as its field's type: counts are whole numbers of at least 1, bars are finite numbers."""
    from compressor.errors import UsageError

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{where} {key} must be a number, got {value!r}")
    if want is int:
        least = 0 if key in COUNTS_MAY_BE_ZERO else 1
        if value != int(value) or value < least:
            raise UsageError(f"{where} {key} is a count: a whole number of at least {least}, got {value!r}")
        return int(value)
    return float(value)


def parse_validation_override(spec: str) -> tuple[str, int | float]:
    """`--validate KEY=VALUE`: a key of the recipe's [validation] table and a number (checked against the model's
    kind of validation once the model is known, as the recipe's own keys are)."""
    from compressor.errors import UsageError

    key, sep, text = spec.partition("=")
    key = key.strip()
    if not sep or key not in VALIDATION_KEYS:
        raise UsageError(f"--validate takes KEY=VALUE with KEY a [validation] key ({', '.join(sorted(VALIDATION_KEYS))}); "
                         f"got '{spec}'")
    try:
        value = int(text) if text.strip().lstrip("+-").isdigit() else float(text)
    except ValueError:
        raise UsageError(f"--validate {key} needs a number, got '{text.strip()}'") from None
    want = {type(getattr(c, key)) for c in _config_classes() if hasattr(c, key)}
    return key, typed_validation_value(key, value, int if want == {int} else float, "--validate")


def _config_classes() -> list[type]:
    from compressor.export.validate_lm import LMValidationConfig

    from compressor.export.speech import SpeechValidation

    return [ValidationConfig, LMValidationConfig, SpeechValidation]
