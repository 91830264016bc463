"""SliceGPT's calibration data, drawn like every calibrating pass's (`compressor.sources.inputs.calibration_inputs`):
the recipe's `[data] calibration` when it gives one, else Wikipedia windows for language models and random crops of
the built-in calibration photographs for vision encoders (validation reads other photographs)."""

from __future__ import annotations

import torch

from compressor.errors import UsageError
from compressor.sources.inputs import MAX_BUILTIN_IMAGES, calibration_description, calibration_inputs


def check_calibration_options(adapter, cfg) -> None:
    """Refuse options that do not apply to the adapter's modality, in one line."""
    if adapter.modality != "image":
        return
    name, defaults = adapter.title or adapter.family, type(cfg)()
    if cfg.tie_head:
        raise UsageError(f"tie_head applies to language models; {name} has no LM head")
    if cfg.calibration_len != defaults.calibration_len:
        raise UsageError(f"slicegpt option(s) calibration_len apply to language models; {name} calibrates on "
                         f"calibration_samples images (seed draws them)")
    if cfg.calibration_samples > MAX_BUILTIN_IMAGES:  # before the norms are folded, not after
        raise UsageError(f"calibration_samples must be at most {MAX_BUILTIN_IMAGES} for {name}, got "
                         f"{cfg.calibration_samples}")


def calibration_samples(handle, cfg) -> tuple[torch.Tensor, dict]:
    """The calibration inputs (token windows or pixel values, one sample a row) and what the manifest says of them."""
    (samples,) = calibration_inputs(handle, cfg.calibration_samples, cfg.calibration_len, cfg.seed)
    info = {"calibration": calibration_description(handle)}
    if handle.adapter.modality == "image":
        return samples, {"calibration_images": int(samples.shape[0]), **info}
    return samples, {"calibration_tokens": int(samples.numel()), **info}
