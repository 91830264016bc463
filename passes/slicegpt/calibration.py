"""SliceGPT's calibration data, drawn like every calibrating pass's (the pass context's `ctx.calibration`): the
recipe's `[data] calibration` when it gives one, else Wikipedia windows for language models and random crops of the
built-in calibration photographs for vision encoders (validation reads other photographs)."""

from __future__ import annotations

import torch

from compressor.errors import UsageError


def check_calibration_options(handle, cfg) -> None:
    """Refuse options that do not apply to the model's kind, in one line."""
    if not handle.target.image:
        return
    adapter = handle.adapter
    name, defaults = adapter.title or adapter.family, type(cfg)()
    if cfg.tie_head:
        raise UsageError(f"tie_head applies to language models; {name} has no LM head")
    if cfg.calibration_len != defaults.calibration_len:
        raise UsageError(f"slicegpt option(s) calibration_len apply to language models; {name} calibrates on "
                         f"calibration_samples images (seed draws them)")


def check_calibration_count(handle, cfg, calibration) -> None:
    """Refuse more calibration images than the built-in photographs give, before the norms are folded, not after."""
    if handle.target.image and cfg.calibration_samples > calibration.max_builtin_images:
        name = handle.adapter.title or handle.adapter.family
        raise UsageError(f"calibration_samples must be at most {calibration.max_builtin_images} for {name}, got "
                         f"{cfg.calibration_samples}")


def calibration_samples(handle, calibration, cfg) -> tuple[torch.Tensor, dict]:
    """The calibration inputs (token windows or pixel values, one sample a row) from `calibration` (`ctx.calibration`)
    and what the manifest says of them."""
    (samples,) = calibration.inputs(cfg.calibration_samples, cfg.calibration_len, cfg.seed)
    info = {"calibration": calibration.description()}
    if handle.target.image:
        return samples, {"calibration_images": int(samples.shape[0]), **info}
    return samples, {"calibration_tokens": int(samples.numel()), **info}
