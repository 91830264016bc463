"""slicegpt: computational invariance (SliceGPT). Fold norms, rotate the residual stream by PCA, delete dimensions.

`portable` mode uses one rotation for the whole residual stream, so no shortcut matrices are needed: the result is
a standard architecture with a smaller hidden size (for RMSNorm, a weightless norm over width D equals a standard
RMSNorm over d with weight sqrt(D/d) and epsilon scaled by D/d), which `save_pretrained` writes and stock
transformers loads.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.errors import UsageError
from compressor.pass_base import Pass, PassResult, register


@dataclass
class SliceGPTConfig:
    sparsity: float = field(default=0.25, metadata={"help": "fraction of the residual width to delete (0 = fold norms only)"})
    mode: str = field(default="portable", metadata={"help": "portable: one shared rotation, a standard smaller model"})
    calibration_samples: int = field(default=128, metadata={"help": "calibration windows from the Wikipedia calibration articles"})
    calibration_len: int = field(default=512, metadata={"help": "tokens per calibration window"})
    seed: int = field(default=42, metadata={"help": "seed for the calibration window offsets"})
    round_to: int = field(default=8, metadata={"help": "sliced width is rounded down to a multiple of this"})
    damping: float = field(default=0.01, metadata={"help": "diagonal damping, relative to the mean eigenvalue"})
    normalize_tokens: bool = field(default=False, metadata={"help": "PCA of per-token normalised activations (tames massive activations)"})
    batch: int = field(default=8, metadata={"help": "calibration windows per forward pass"})

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must lie in [0, 1), got {self.sparsity}")
        if self.mode not in ("portable",):
            raise ValueError(f"mode must be 'portable' (per_layer is not implemented yet), got {self.mode!r}")
        if self.calibration_samples < 1 or self.calibration_len < 2 or self.batch < 1 or self.round_to < 1:
            raise ValueError("calibration_samples, batch and round_to must be >= 1 and calibration_len >= 2")


def sliced_width(width: int, sparsity: float, round_to: int) -> int:
    return max(round_to, int((1.0 - sparsity) * width) // round_to * round_to)


@torch.no_grad()
def fold_norms(adapter) -> None:
    """Fold every RMSNorm scale into the linears that read it; norms become weightless. Unties the LM head."""
    for layer in adapter.layers:
        for norm_name, readers in layer.residual_readers.items():
            norm = getattr(layer, norm_name)
            for lin in readers:
                lin.weight.mul_(norm.weight[None, :])
            norm.weight.fill_(1.0)
    head, norm = adapter.lm_head, adapter.final_norm_module
    head.weight = nn.Parameter(head.weight.detach().clone() * norm.weight[None, :])
    norm.weight.fill_(1.0)
    adapter.model.config.tie_word_embeddings = False


@torch.no_grad()
def residual_second_moment(adapter, windows: torch.Tensor, batch: int, normalize: bool) -> torch.Tensor:
    """Sum of x x^T over every token at every residual boundary (each norm's input), accumulated in float64."""
    width = adapter.config.hidden_size
    acc = torch.zeros(width, width, dtype=torch.float64)
    norms = [m for layer in adapter.layers for m in (layer.attn_norm, layer.mlp_norm)] + [adapter.final_norm_module]

    def hook(_module, args):
        x = args[0].reshape(-1, width).float()
        if normalize:
            x = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        acc.add_((x.T @ x).double())

    handles = [n.register_forward_pre_hook(hook) for n in norms]
    try:
        for i in range(0, len(windows), batch):
            adapter.model.model(input_ids=windows[i:i + batch], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return acc


def pca_rotation(moment: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors of the damped second moment, by descending eigenvalue (float64)."""
    damp = damping * moment.diagonal().mean()
    values, vectors = torch.linalg.eigh(moment + damp * torch.eye(moment.shape[0], dtype=moment.dtype))
    order = values.argsort(descending=True)
    return values[order], vectors[:, order]


def _set_linear(lin: nn.Linear, weight: torch.Tensor) -> None:
    lin.weight = nn.Parameter(weight.contiguous().float(), requires_grad=False)
    lin.out_features, lin.in_features = weight.shape


@torch.no_grad()
def rotate_and_slice(adapter, q: torch.Tensor, d: int) -> None:
    """Rotate every reader and writer of the residual stream by Q and keep the first d directions."""
    width = adapter.config.hidden_size
    qd = q[:, :d].double()
    emb = adapter.embed_tokens
    emb.weight = nn.Parameter((emb.weight.double() @ qd).float(), requires_grad=False)
    emb.embedding_dim = d
    for layer in adapter.layers:
        for readers in layer.residual_readers.values():
            for lin in readers:
                _set_linear(lin, lin.weight.double() @ qd)
        for lin in layer.residual_writers:
            _set_linear(lin, qd.T @ lin.weight.double())
            if lin.bias is not None:
                lin.bias = nn.Parameter((qd.T @ lin.bias.double()).float(), requires_grad=False)
    _set_linear(adapter.lm_head, adapter.lm_head.weight.double() @ qd)
    # weightless RMS over D == standard RMSNorm over d with weight sqrt(D/d) and eps * D/d
    eps = adapter.config.rms_norm_eps * width / d
    for norm in [m for layer in adapter.layers for m in (layer.attn_norm, layer.mlp_norm)] + [adapter.final_norm_module]:
        norm.weight = nn.Parameter(torch.full((d,), math.sqrt(width / d)), requires_grad=False)
        norm.variance_epsilon = eps
    c = adapter.config
    c.head_dim = adapter.head_dim
    c.hidden_size = d
    c.rms_norm_eps = eps


@register
class SliceGPT(Pass):
    name = "slicegpt"
    summary = "SliceGPT: fold norms, rotate the residual stream by PCA on calibration text, slice its width"
    Config = SliceGPTConfig
    requires = frozenset({"pre_norm", "rms_norm"})
    ensures = frozenset({"sliced"})

    def check(self, handle) -> None:
        if handle.adapter.norm_placement != "pre":
            raise UsageError(
                f"slicegpt needs a pre-norm model; {handle.adapter.family} normalises after each residual add (post-norm), "
                "so a rotation of the residual stream cannot pass through its norms (computational invariance breaks)"
            )
        if "rms_norm" not in handle.capabilities:
            raise UsageError(f"slicegpt supports RMSNorm (Llama-family) models so far; {handle.adapter.family} uses LayerNorm")

    def run(self, handle) -> PassResult:
        cfg: SliceGPTConfig = self.config
        adapter = handle.adapter
        width = adapter.config.hidden_size
        params_before = sum(p.numel() for p in adapter.model.parameters())
        start = time.perf_counter()
        fold_norms(adapter)
        info = {"width_before": width, "folded_seconds": round(time.perf_counter() - start, 3)}
        if cfg.sparsity == 0.0:
            info.update(width_after=width, params_before=params_before,
                        params_after=sum(p.numel() for p in adapter.model.parameters()))
            return PassResult(modified=True, info=info)
        from compressor.lm_data import calibration_windows

        windows = calibration_windows(adapter.tokenizer_file, cfg.calibration_samples, cfg.calibration_len, cfg.seed)
        t = time.perf_counter()
        moment = residual_second_moment(adapter, windows, cfg.batch, cfg.normalize_tokens)
        values, q = pca_rotation(moment, cfg.damping)
        d = sliced_width(width, cfg.sparsity, cfg.round_to)
        rotate_and_slice(adapter, q, d)
        info.update(
            width_after=d,
            calibration_tokens=int(windows.numel()),
            calibration_seconds=round(time.perf_counter() - t, 2),
            kept_variance=float(values[:d].sum() / values.sum()),
            params_before=params_before,
            params_after=sum(p.numel() for p in adapter.model.parameters()),
            lm_head_untied=True,
        )
        return PassResult(modified=True, info=info)
