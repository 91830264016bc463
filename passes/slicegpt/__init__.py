"""slicegpt: computational invariance (SliceGPT). Fold norms, rotate the residual stream by PCA, delete dimensions.

`portable` mode uses one rotation for the whole residual stream, so no shortcut matrices are needed: the result is
a standard architecture with a smaller hidden size (for RMSNorm, a weightless norm over width D equals a standard
RMSNorm over d with weight sqrt(D/d) and epsilon scaled by D/d), which `save_pretrained` writes and stock
transformers loads. `per_layer` mode is the paper's: a rotation per residual boundary and shortcut matrices.
The pass speaks to the family through its adapter's slicing interface (`ModelAdapter.fold_norms` and what follows
it in models/base.py); rotation.py holds the math every family shares.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.errors import UsageError
from compressor.models import SliceableAdapter
from compressor.passes.slicegpt.calibration import calibration_samples, check_calibration_count, check_calibration_options
from compressor.passes.slicegpt.pca import pca_rotation
from compressor.passes.slicegpt.rotation import (boundary_spectra, fold_norms, residual_second_moment, rotate_and_slice,
                                                 slice_boundaries, slice_per_layer, some)
from compressor.passes.slicegpt.tie_head import tie_head
from compressor.pipeline.pass_base import Pass, PassResult, register

__all__ = ["SliceGPT", "SliceGPTConfig", "boundary_spectra", "fold_norms", "rotate_and_slice", "slice_boundaries",
           "slice_per_layer"]


@dataclass
class SliceGPTConfig:
    sparsity: float = field(default=0.25, metadata={"help": "fraction of the residual width to delete (0 = fold norms only)"})
    mode: str = field(default="portable", metadata={"help": "portable: one shared rotation, a standard smaller model; per_layer: the paper's rotation per boundary with shortcut matrices"})
    slice_head: bool = field(default=False, metadata={"help": "per_layer: also slice the last boundary, the LM head's (DINOv2: the final norm's) input (portable always does)"})
    calibration_samples: int = field(default=128, metadata={"help": "calibration inputs: windows of calibration_len tokens from the Wikipedia calibration articles (language models), random crops of the built-in calibration photographs (DINOv2), or drawn from [data] calibration when given"})
    calibration_len: int = field(default=512, metadata={"help": "tokens per calibration window (language models)"})
    seed: int = field(default=42, metadata={"help": "seed for the calibration window offsets (language models)"})
    round_to: int = field(default=8, metadata={"help": "sliced width is rounded down to a multiple of this"})
    damping: float = field(default=0.01, metadata={"help": "diagonal damping, relative to the mean eigenvalue"})
    normalize_tokens: bool = field(default=False, metadata={"help": "PCA of per-token normalised activations (tames massive activations)"})
    tie_head: bool = field(default=False, metadata={"help": "portable: keep the LM head tied to the embedding (fits the final norm's weight instead; saves vocab x width parameters)"})
    batch: int = field(default=8, metadata={"help": "calibration windows per forward pass"})
    schedule: str = field(default="uniform", metadata={"help": "per_layer: uniform (every boundary at the same width) or spectrum (widths from each boundary's eigen-spectrum, same total)"})

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must lie in [0, 1), got {self.sparsity}")
        if self.mode not in ("portable", "per_layer"):
            raise ValueError(f"mode must be 'portable' or 'per_layer', got {self.mode!r}")
        if self.tie_head and self.mode != "portable":
            raise ValueError("tie_head needs mode = 'portable' (per_layer rotates the embedding and the head's input differently, so they cannot share weights)")
        if self.slice_head and self.mode != "per_layer":
            raise ValueError("slice_head applies to mode = 'per_layer' (portable slices every boundary, the head's input included)")
        if self.tie_head and self.sparsity == 0.0:
            raise ValueError("tie_head applies to sliced models (sparsity > 0)")
        if self.schedule not in ("uniform", "spectrum"):
            raise ValueError(f"schedule must be 'uniform' or 'spectrum', got {self.schedule!r}")
        if self.schedule == "spectrum" and self.mode != "per_layer":
            raise ValueError("schedule = 'spectrum' needs mode = 'per_layer' (portable shares one rotation, so every boundary has the same width)")
        if self.schedule == "spectrum" and self.sparsity == 0.0:
            raise ValueError("schedule = 'spectrum' applies to sliced models (sparsity > 0)")
        if self.calibration_samples < 1 or self.calibration_len < 2 or self.batch < 1 or self.round_to < 1:
            raise ValueError("calibration_samples, batch and round_to must be >= 1 and calibration_len >= 2")


def sliced_width(width: int, sparsity: float, round_to: int) -> int:
    return max(round_to, int((1.0 - sparsity) * width) // round_to * round_to)


def _params(model: nn.Module, only: str = "") -> int:
    """Parameters of the model (with `only`, of those whose name contains it, e.g. the shortcut matrices)."""
    return sum(p.numel() for n, p in model.named_parameters() if only in n)


@register
class SliceGPT(Pass):
    name = "slicegpt"
    summary = "SliceGPT: fold norms, rotate the residual stream by PCA on calibration text, slice its width"
    Config = SliceGPTConfig
    requires = frozenset({"pre_norm"})
    ensures = frozenset({"sliced"})

    def ensured(self) -> frozenset[str]:
        return self.ensures if self.config.sparsity > 0.0 else frozenset()  # sparsity 0 folds the norms only

    def calibration_need(self, target):
        return "calibration_samples", self.config.calibration_samples

    def check(self, handle) -> None:
        if not isinstance(handle.adapter, SliceableAdapter):
            raise UsageError(handle.adapter.slicing_refusal)
        check_calibration_options(handle, self.config)

    def run(self, handle, ctx) -> PassResult:
        cfg: SliceGPTConfig = self.config
        adapter = handle.adapter
        lm = handle.target.decoder
        check_calibration_count(handle, cfg, ctx.calibration)
        width, params_before = adapter.config.hidden_size, _params(adapter.model)
        start = time.perf_counter()
        adapter.fold_norms()
        info = {"width_before": width, "params_before": params_before}
        if lm:  # the manifest keys each kind of model has had since its first release
            info["folded_seconds"] = round(time.perf_counter() - start, 3)
        else:
            info.update(mode=cfg.mode, transformers_loadable=False)
        if cfg.sparsity > 0.0:
            info.update(self._slice(handle, ctx, sliced_width(width, cfg.sparsity, cfg.round_to)))
        elif lm:
            info["width_after"] = width
        info["params_after"] = _params(adapter.model)
        return PassResult(modified=True, info=info)

    def _slice(self, handle, ctx, d: int) -> dict:
        """Calibrate, rotate and slice the folded model to width d (per_layer: d on average); returns the info."""
        cfg: SliceGPTConfig = self.config
        adapter = handle.adapter
        samples, info = calibration_samples(handle, ctx.calibration, cfg)
        t = time.perf_counter()
        if cfg.mode == "portable":
            moment = residual_second_moment(adapter, torch.split(samples, cfg.batch), cfg.normalize_tokens)
            values, q = pca_rotation(moment, cfg.damping)
            rotate_and_slice(adapter, q, d)
            kept = float(values[:d].sum() / values.sum())
            if cfg.tie_head:
                info["tied_head_logit_error"] = tie_head(adapter, some(samples, cfg.batch), cfg.batch)
        else:
            kept, widths = slice_per_layer(adapter, samples, d, cfg)
            info.update(width_schedule=cfg.schedule, boundary_widths=widths)
        info.update(mode=cfg.mode, width_after=d, calibration_seconds=round(time.perf_counter() - t, 2),
                    kept_variance=kept)
        lm = handle.target.decoder
        if lm:
            info.update(lm_head_untied=not cfg.tie_head, transformers_loadable=cfg.mode == "portable")
        if lm or cfg.mode == "per_layer":
            info["shortcut_params"] = _params(adapter.model, "shortcut")
        return info
