"""SliceGPT's calibration data, chosen by modality: Wikipedia windows for language models, Fashion-MNIST training
images for vision encoders (away from the first ones, which the benchmarks probe with)."""

from __future__ import annotations

import torch

from compressor.errors import UsageError

IMAGE_CALIBRATION_START = 5000
IMAGE_CALIBRATION_IMAGES = 60000 - IMAGE_CALIBRATION_START


def check_calibration_options(adapter, cfg) -> None:
    """Refuse options that do not apply to the adapter's modality, in one line."""
    if adapter.modality != "image":
        return
    name, defaults = adapter.title or adapter.family, type(cfg)()
    if cfg.tie_head:
        raise UsageError(f"tie_head applies to language models; {name} has no LM head")
    text_only = [n for n in ("calibration_len", "seed") if getattr(cfg, n) != getattr(defaults, n)]
    if text_only:
        raise UsageError(f"slicegpt option(s) {', '.join(text_only)} apply to language models; {name} calibrates on "
                         f"the first calibration_samples Fashion-MNIST training images from index {IMAGE_CALIBRATION_START}")
    if cfg.calibration_samples > IMAGE_CALIBRATION_IMAGES:
        raise UsageError(f"calibration_samples must be at most {IMAGE_CALIBRATION_IMAGES} for {name} (Fashion-MNIST "
                         f"training images from index {IMAGE_CALIBRATION_START}), got {cfg.calibration_samples}")


def calibration_samples(handle, cfg) -> tuple[torch.Tensor, dict]:
    """The calibration inputs (token windows or pixel values, one sample a row) and what the manifest says of them."""
    if handle.adapter.modality == "image":
        from compressor.sources import data
        from compressor.sources.inputs import preprocessor

        images, _ = data.fashion_mnist("train")
        pixels = torch.from_numpy(preprocessor(handle)(
            [images[IMAGE_CALIBRATION_START + i] for i in range(cfg.calibration_samples)])["pixel_values"])
        return pixels, {"calibration_images": cfg.calibration_samples}
    from compressor.sources.lm_data import calibration_windows

    windows = calibration_windows(handle.adapter.tokenizer_file, cfg.calibration_samples, cfg.calibration_len, cfg.seed)
    return windows, {"calibration_tokens": int(windows.numel())}
