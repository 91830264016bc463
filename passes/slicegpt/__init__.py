"""slicegpt: computational invariance (SliceGPT). Fold norms, rotate the residual stream by PCA, delete dimensions.

`portable` mode uses one rotation for the whole residual stream, so no shortcut matrices are needed: the result is
a standard architecture with a smaller hidden size (for RMSNorm, a weightless norm over width D equals a standard
RMSNorm over d with weight sqrt(D/d) and epsilon scaled by D/d), which `save_pretrained` writes and stock
transformers loads. `per_layer` mode is the paper's: a rotation per residual boundary and shortcut matrices.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.errors import UsageError
from compressor.passes.slicegpt.pca import normalized_spectrum, pca_keeping, pca_rotation, second_moment
from compressor.pipeline.pass_base import Pass, PassResult, register


@dataclass
class SliceGPTConfig:
    sparsity: float = field(default=0.25, metadata={"help": "fraction of the residual width to delete (0 = fold norms only)"})
    mode: str = field(default="portable", metadata={"help": "portable: one shared rotation, a standard smaller model; per_layer: the paper's rotation per boundary with shortcut matrices"})
    slice_head: bool = field(default=False, metadata={"help": "per_layer: also slice the last boundary, the LM head's (DINOv2: the final norm's) input (portable always does)"})
    calibration_samples: int = field(default=128, metadata={"help": "calibration windows from the Wikipedia calibration articles (DINOv2: Fashion-MNIST training images)"})
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
    """Sum of x x^T over every token at every residual boundary (each norm's input), float64: portable mode's one
    rotation. One width x width matrix in memory, whatever the depth."""
    width = adapter.config.hidden_size
    norms = [m for layer in adapter.layers for m in (layer.attn_norm, layer.mlp_norm)] + [adapter.final_norm_module]
    moment = torch.zeros(width, width, dtype=torch.float64)

    def accumulate(_module, args):  # returns None: the norm's input is left as it is
        moment.add_(second_moment(args[0], normalize))

    handles = [n.register_forward_pre_hook(accumulate) for n in norms]
    try:
        for i in range(0, len(windows), batch):
            adapter.model.model(input_ids=windows[i:i + batch], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return moment


@torch.no_grad()
def boundary_spectra(adapter, windows: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """Eigenvalues (descending) of the per-token normalised second moment at every residual boundary of the model
    (the embedding's output, after each attention, after each MLP), walked block by block over all windows: memory
    is a boundary's activations (two while a block runs) and one width x width matrix, so it scales with depth and
    width like the per_layer slicing that follows."""
    from compressor.program.decoder import rotary_and_bias, self_attention

    xs = [adapter.embed_tokens(ids) for ids in torch.split(windows, batch)]
    geometry = [rotary_and_bias(adapter, x, torch.ones(x.shape[:2], dtype=torch.long), 0) for x in xs]

    spectra = [normalized_spectrum(xs)]
    for layer in adapter.layers:
        xs = [x + layer.o(self_attention(adapter, layer, layer.attn_norm(x), *g)[0]) for x, g in zip(xs, geometry)]
        spectra.append(normalized_spectrum(xs))
        xs = [x + layer.mlp_out(x) for x in xs]
        spectra.append(normalized_spectrum(xs))
    return spectra


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
    c = adapter.config
    for norm in [m for layer in adapter.layers for m in (layer.attn_norm, layer.mlp_norm)] + [adapter.final_norm_module]:
        _set_norm(norm, width, d, c.rms_norm_eps)
    c.head_dim = adapter.head_dim
    c.hidden_size = d
    c.rms_norm_eps = c.rms_norm_eps * width / d


@torch.no_grad()
def tie_head(adapter, windows: torch.Tensor, batch: int) -> float:
    """Share the embedding with the LM head again after portable slicing; returns the relative logit error left.

    Folding the final norm's scale g made the head E diag(g) Q_d, which the embedding E Q_d cannot express; the
    head becomes E Q_d diag(h) instead, with h (the final norm's new weight) fitted by least squares on the logits:
    h = argmin E||E_d diag(h) z - H z||^2 over the final norm's outputs z, i.e. (G o C) h = diag(E_d^T H C) with
    G = E_d^T E_d and C = E[z z^T]. A recovery step (the distill pass) trains away what remains.
    """
    norm, head, emb = adapter.final_norm_module, adapter.lm_head, adapter.embed_tokens
    d = emb.weight.shape[1]
    c = torch.zeros(d, d, dtype=torch.float64)
    handle = norm.register_forward_hook(lambda _m, _a, out: c.add_(second_moment(out, False)))
    try:
        for ids in torch.split(windows, batch):
            adapter.model.model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    e, h_untied = emb.weight.double(), head.weight.double()
    g = e.T @ e
    cross = e.T @ h_untied
    h = torch.linalg.solve(g * c, (cross @ c).diagonal())
    total = torch.trace(h_untied.T @ h_untied @ c)  # E||H z||^2
    left = torch.trace((torch.diag(h) @ g @ torch.diag(h) - 2 * torch.diag(h) @ cross) @ c) + total
    norm.weight = nn.Parameter((norm.weight.double() * h).float(), requires_grad=False)
    head.weight = emb.weight
    adapter.model.config.tie_word_embeddings = True
    return float((left.clamp(min=0) / total).sqrt())


def _params(model: nn.Module, only: str = "") -> int:
    """Parameters of the model (with `only`, of those whose name contains it, e.g. the shortcut matrices)."""
    return sum(p.numel() for n, p in model.named_parameters() if only in n)


def _some(windows: torch.Tensor, batch: int) -> torch.Tensor:
    """A quarter of the calibration windows (at least one batch): enough for a fit of one vector or a spectrum's
    shape, which need fewer tokens than a rotation."""
    return windows[: max(batch, len(windows) // 4)]


def _set_norm(norm: nn.Module, width: int, d: int, eps: float) -> None:
    """A weightless RMS norm over `width` acting on a d-dim slice: weight sqrt(width/d), epsilon eps*width/d."""
    norm.weight = nn.Parameter(torch.full((d,), math.sqrt(width / d)), requires_grad=False)
    norm.variance_epsilon = eps * width / d


def per_layer_widths(spectra_of, layers: int, width: int, d: int, cfg: SliceGPTConfig) -> list[int]:
    """Width of every residual boundary (embedding output, then after each attention and each MLP block): d each,
    or (schedule = spectrum) chosen from each boundary's eigen-spectrum in the folded model with the same total.
    `spectra_of()` returns the 2 * layers + 1 boundaries' eigenvalues, descending (a quarter of the calibration
    data is enough for a spectrum's shape). The last boundary (the head's input) stays at full width unless
    slice_head."""
    n = 2 * layers + (1 if cfg.slice_head else 0)
    widths = [d] * n
    if cfg.schedule == "spectrum":
        from compressor.passes.slicegpt.slice_schedule import spectrum_widths

        spectra = spectra_of()[:n]
        low = max(cfg.round_to, d - (width - d) // cfg.round_to * cfg.round_to)
        widths = spectrum_widths(spectra, d, cfg.round_to, low, width // cfg.round_to * cfg.round_to)
    return widths + [width] * (2 * layers + 1 - n)


@torch.no_grad()
def slice_per_layer(adapter, windows: torch.Tensor, d: int, cfg: SliceGPTConfig) -> tuple[float, list[int]]:
    """The paper's mode: a PCA rotation per residual boundary, computed layer by layer from the already-sliced
    upstream model (memory: one boundary's activations), with shortcut matrices Q_a^T Q_b on the residual paths.
    Returns the mean fraction of variance kept over the boundaries, and the boundaries' widths."""
    from compressor.program.decoder import rotary_and_bias, self_attention

    ad, width, eps = adapter, adapter.config.hidden_size, adapter.config.rms_norm_eps
    widths = per_layer_widths(lambda: boundary_spectra(adapter, _some(windows, cfg.batch), cfg.batch),
                              len(ad.layers), width, d, cfg)
    chunks = list(torch.split(windows, cfg.batch))
    kept = []

    pca = pca_keeping(cfg.damping, kept)
    xs = [ad.embed_tokens(c) for c in chunks]
    q_cur = pca(sum(second_moment(x, cfg.normalize_tokens) for x in xs), widths[0])
    ad.embed_tokens.weight = nn.Parameter(ad.embed_tokens.weight @ q_cur, requires_grad=False)
    ad.embed_tokens.embedding_dim = widths[0]
    xs = [x @ q_cur for x in xs]
    geometry = [rotary_and_bias(ad, x, torch.ones(x.shape[:2], dtype=torch.long), 0) for x in xs]
    for j, layer in enumerate(ad.layers):
        for block in ("attn", "mlp"):
            norm = layer.attn_norm if block == "attn" else layer.mlp_norm
            _set_norm(norm, width, q_cur.shape[1], eps)
            for lin in layer.residual_readers[f"{block}_norm"]:
                _set_linear(lin, lin.weight @ q_cur)
            writer = layer.o if block == "attn" else layer.fc_out
            ys = []
            for x, (cos, sin, bias) in zip(xs, geometry):
                if block == "attn":
                    out = writer(self_attention(ad, layer, norm(x), cos, sin, bias)[0])
                else:
                    out = layer.mlp_out(x)
                ys.append(x @ q_cur.T + out)  # the block's output in the original (unrotated) basis
            keep = widths[2 * j + (1 if block == "attn" else 2)]
            q_next = pca(sum(second_moment(y, cfg.normalize_tokens) for y in ys), keep)
            shortcut = nn.Linear(q_cur.shape[1], keep, bias=False)
            shortcut.weight = nn.Parameter((q_cur.T @ q_next).T.contiguous(), requires_grad=False)
            setattr(layer.layer, f"{block}_shortcut", shortcut)
            _set_linear(writer, q_next.T @ writer.weight)
            if writer.bias is not None:  # a writer's bias is rotated too (a reader's is unchanged by its input's rotation)
                writer.bias = nn.Parameter(q_next.T @ writer.bias, requires_grad=False)
            xs = [y @ q_next for y in ys]
            q_cur = q_next
    final_d = q_cur.shape[1]
    if final_d != width:
        _set_norm(ad.final_norm_module, width, final_d, eps)
    _set_linear(ad.lm_head, ad.lm_head.weight @ q_cur)
    return float(sum(kept) / len(kept)), widths


VIT_CALIBRATION_START = 5000  # DINOv2 calibration images: away from the first ones, which the benchmarks probe with
VIT_CALIBRATION_IMAGES = 60000 - VIT_CALIBRATION_START


@register
class SliceGPT(Pass):
    name = "slicegpt"
    summary = "SliceGPT: fold norms, rotate the residual stream by PCA on calibration text, slice its width"
    Config = SliceGPTConfig
    requires = frozenset({"pre_norm"})
    ensures = frozenset({"sliced"})

    def check(self, handle) -> None:
        if handle.adapter.norm_placement == "sandwich":
            raise UsageError(
                f"slicegpt cannot rotate {handle.adapter.family}'s residual stream: each block's output passes an RMSNorm "
                "before the residual add, and the norm's per-channel scale does not commute with a rotation "
                "(computational invariance breaks); use width_prune, layer_prune or distill"
            )
        if handle.adapter.norm_placement != "pre":
            raise UsageError(
                f"slicegpt needs a pre-norm model; {handle.adapter.family} normalises after each residual add (post-norm), "
                "so a rotation of the residual stream cannot pass through its norms (computational invariance breaks)"
            )
        from compressor.models import LlamaAdapter

        if handle.adapter.family != "dinov2" and not isinstance(handle.adapter, LlamaAdapter):
            raise UsageError(f"slicegpt supports Llama-family decoders (Llama, Qwen2, Qwen3, Mistral, Phi-3) and DINOv2 so far, not {handle.adapter.family}")
        if handle.adapter.family == "dinov2":
            self._check_vit()

    def _check_vit(self) -> None:
        cfg, defaults = self.config, SliceGPTConfig()
        if cfg.tie_head:
            raise UsageError("tie_head applies to language models; DINOv2 has no LM head")
        text_only = [n for n in ("calibration_len", "seed") if getattr(cfg, n) != getattr(defaults, n)]
        if text_only:
            raise UsageError(f"slicegpt option(s) {', '.join(text_only)} apply to language models; DINOv2 calibrates on "
                             f"the first calibration_samples Fashion-MNIST training images from index {VIT_CALIBRATION_START}")
        if cfg.calibration_samples > VIT_CALIBRATION_IMAGES:
            raise UsageError(f"calibration_samples must be at most {VIT_CALIBRATION_IMAGES} for DINOv2 (Fashion-MNIST "
                             f"training images from index {VIT_CALIBRATION_START}), got {cfg.calibration_samples}")

    def run(self, handle) -> PassResult:
        if handle.adapter.family == "dinov2":
            return self._run_vit(handle)
        cfg: SliceGPTConfig = self.config
        adapter = handle.adapter
        width = adapter.config.hidden_size
        params_before = _params(adapter.model)
        start = time.perf_counter()
        fold_norms(adapter)
        info = {"width_before": width, "folded_seconds": round(time.perf_counter() - start, 3)}
        if cfg.sparsity == 0.0:
            info.update(width_after=width, params_before=params_before,
                        params_after=_params(adapter.model))
            return PassResult(modified=True, info=info)
        from compressor.sources.lm_data import calibration_windows

        windows = calibration_windows(adapter.tokenizer_file, cfg.calibration_samples, cfg.calibration_len, cfg.seed)
        t = time.perf_counter()
        d = sliced_width(width, cfg.sparsity, cfg.round_to)
        if cfg.mode == "portable":
            moment = residual_second_moment(adapter, windows, cfg.batch, cfg.normalize_tokens)
            values, q = pca_rotation(moment, cfg.damping)
            rotate_and_slice(adapter, q, d)
            kept = float(values[:d].sum() / values.sum())
            if cfg.tie_head:
                info["tied_head_logit_error"] = tie_head(adapter, _some(windows, cfg.batch), cfg.batch)
        else:
            kept, widths = slice_per_layer(adapter, windows, d, cfg)
            info.update(width_schedule=cfg.schedule, boundary_widths=widths)
        info.update(
            mode=cfg.mode,
            width_after=d,
            calibration_tokens=int(windows.numel()),
            calibration_seconds=round(time.perf_counter() - t, 2),
            kept_variance=kept,
            shortcut_params=_params(adapter.model, "shortcut"),
            params_before=params_before,
            params_after=_params(adapter.model),
            lm_head_untied=not cfg.tie_head,
            transformers_loadable=cfg.mode == "portable",
        )
        return PassResult(modified=True, info=info)

    def _run_vit(self, handle) -> PassResult:
        """DINOv2: centre and fold LayerNorms, PCA on calibration images, rotate and slice (either mode)."""
        from compressor.sources import data
        from compressor.sources.inputs import preprocessor
        from compressor.passes.slicegpt.vit_slicing import (boundary_spectra_vit, fold_layernorms, rotate_and_slice_vit,
                                            slice_per_layer_vit, stream_second_moment)

        cfg: SliceGPTConfig = self.config
        adapter = handle.adapter
        width = adapter.config.hidden_size
        params_before = _params(adapter.model)
        fold_layernorms(adapter)
        adapter.non_stock = "SliceGPT centred DINOv2's residual stream and folded its LayerNorms"
        info = {"mode": cfg.mode, "width_before": width, "params_before": params_before, "transformers_loadable": False}
        if cfg.sparsity > 0:
            t = time.perf_counter()
            images, _ = data.fashion_mnist("train")
            pixels = torch.from_numpy(preprocessor(handle)(
                [images[VIT_CALIBRATION_START + i] for i in range(cfg.calibration_samples)])["pixel_values"])
            d = sliced_width(width, cfg.sparsity, cfg.round_to)
            if cfg.mode == "portable":
                values, q = pca_rotation(stream_second_moment(adapter, pixels.split(cfg.batch), cfg.normalize_tokens), cfg.damping)
                rotate_and_slice_vit(adapter, q.float(), d)
                kept = float(values[:d].sum() / values.sum())
            else:
                some = _some(pixels, cfg.batch).split(cfg.batch)
                widths = per_layer_widths(lambda: boundary_spectra_vit(adapter, some), len(adapter.layers), width, d, cfg)
                fractions: list[float] = []
                slice_per_layer_vit(adapter, pixels.split(cfg.batch), widths, pca_keeping(cfg.damping, fractions),
                                    cfg.normalize_tokens)
                kept = sum(fractions) / len(fractions)
                info.update(width_schedule=cfg.schedule, boundary_widths=widths,
                            shortcut_params=_params(adapter.model, "shortcut"))
            info.update(width_after=d, calibration_images=cfg.calibration_samples,
                        calibration_seconds=round(time.perf_counter() - t, 2), kept_variance=kept)
        info["params_after"] = _params(adapter.model)
        return PassResult(modified=True, info=info)
