"""SliceGPT's rotations, the same for every family: readers of the residual stream turn by Q, writers by Q^T, and
shortcut matrices Q_a^T Q_b join boundaries rotated differently. The family's adapter (models/) folds its norms and
says where its stream is read and written, where its embeddings, norms and head sit, and how to step its blocks."""

from __future__ import annotations

import torch
from torch import nn

from compressor.passes.slicegpt.pca import normalized_spectrum, pca_keeping, second_moment


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.contiguous().float(), requires_grad=False)


def read_from(lin: nn.Linear, q: torch.Tensor) -> None:
    """`lin` reads the rotated stream's first q.shape[1] directions (its bias is unchanged). Computed in q's
    precision, as every rotation here: float64 for portable's one rotation, float32 for per_layer's."""
    lin.weight = _param(lin.weight.to(q.dtype) @ q)
    lin.in_features = q.shape[1]


def write_to(lin: nn.Linear, q: torch.Tensor) -> None:
    """`lin` writes the rotated stream's first q.shape[1] directions (its bias turns too)."""
    lin.weight = _param(q.T @ lin.weight.to(q.dtype))
    if lin.bias is not None:
        lin.bias = _param(q.T @ lin.bias.to(q.dtype))
    lin.out_features = q.shape[1]


def fold_norms(adapter) -> None:
    """The family folds its norms (see `ModelAdapter.fold_norms`)."""
    adapter.fold_norms()


@torch.no_grad()
def residual_second_moment(adapter, batches, normalize: bool) -> torch.Tensor:
    """Sum of x x^T over every token at every residual boundary (each norm's input), float64: portable mode's one
    rotation. One width x width matrix in memory, whatever the depth."""
    width = adapter.config.hidden_size
    moment = torch.zeros(width, width, dtype=torch.float64)

    def accumulate(_module, args):  # returns None: the norm's input is left as it is
        moment.add_(second_moment(args[0], normalize))

    handles = [n.register_forward_pre_hook(accumulate) for n in adapter.residual_norms]
    try:
        for batch in batches:
            adapter.calibration_forward(batch)
    finally:
        for h in handles:
            h.remove()
    return moment


def boundaries(adapter, batches):
    """The residual stream at every boundary (the embeddings' output, after each attention, after each MLP) for all
    batches at once, walked block by block: one boundary's activations at a time (two while a block runs)."""
    xs = [adapter.embed_stream(b) for b in batches]
    contexts = [adapter.stream_context(x) for x in xs]
    yield xs
    for layer in adapter.layers:
        for block in ("attn", "mlp"):
            xs = [x + adapter.block_write(layer, block, x, c) for x, c in zip(xs, contexts)]
            yield xs


@torch.no_grad()
def boundary_spectra(adapter, samples: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """Eigenvalues (descending) of the per-token normalised second moment at every residual boundary: memory is a
    boundary's activations and one width x width matrix, so it scales like the per_layer slicing that follows."""
    return [normalized_spectrum(xs) for xs in boundaries(adapter, torch.split(samples, batch))]


@torch.no_grad()
def rotate_and_slice(adapter, q: torch.Tensor, d: int) -> None:
    """Portable mode: rotate every reader and writer of the residual stream by one Q and keep the first d directions."""
    width, qd = adapter.config.hidden_size, q[:, :d]
    adapter.rotate_embeddings(qd)
    for layer in adapter.layers:
        for readers in layer.residual_readers.values():
            for lin in readers:
                read_from(lin, qd)
        for lin in layer.residual_writers:
            write_to(lin, qd)
            layer.writer_sliced(lin)
    for lin in adapter.head_readers:
        read_from(lin, qd)
    for norm in adapter.residual_norms:
        adapter.set_sliced_norm(norm, width, d)
    adapter.record_sliced_width(width, d)


@torch.no_grad()
def slice_boundaries(adapter, batches, widths: list[int], pca, normalize: bool) -> None:
    """The paper's mode: a PCA rotation per residual boundary, computed block by block from the already-sliced
    upstream model (memory: one boundary's activations), with shortcut matrices Q_a^T Q_b on the residual paths.

    `widths` holds the 2 * layers + 1 boundary widths (embeddings' output, after each attention, after each MLP);
    `pca(moment, keep)` returns the first `keep` eigenvectors (width x keep) of a second moment (of per-token
    normalised activations with `normalize`)."""
    width = adapter.config.hidden_size
    xs = [adapter.embed_stream(b) for b in batches]
    q = pca(sum(second_moment(x, normalize) for x in xs), widths[0])
    adapter.rotate_embeddings(q)
    xs = [x @ q for x in xs]
    contexts = [adapter.stream_context(x) for x in xs]
    for j, layer in enumerate(adapter.layers):
        blocks = zip(("attn", "mlp"), layer.residual_readers.items(), layer.residual_writers)
        for k, (block, (norm_name, readers), writer) in enumerate(blocks):
            adapter.set_sliced_norm(getattr(layer, norm_name), width, q.shape[1])
            for lin in readers:
                read_from(lin, q)
            # the block's output in the original (unrotated) basis
            ys = [x @ q.T + adapter.block_write(layer, block, x, c) for x, c in zip(xs, contexts)]
            q_next = pca(sum(second_moment(y, normalize) for y in ys), widths[2 * j + 1 + k])
            shortcut = nn.Linear(q.shape[1], q_next.shape[1], bias=False)
            shortcut.weight = _param((q.T @ q_next).T)
            setattr(layer.layer, f"{block}_shortcut", shortcut)
            write_to(writer, q_next)
            layer.writer_sliced(writer)
            xs = [y @ q_next for y in ys]
            q = q_next
    if q.shape[1] != width:
        adapter.set_sliced_norm(adapter.residual_norms[-1], width, q.shape[1])
    for lin in adapter.head_readers:
        read_from(lin, q)


def some(samples: torch.Tensor, batch: int) -> torch.Tensor:
    """A quarter of the calibration samples (at least one batch): enough for a fit of one vector or a spectrum's
    shape, which need fewer tokens than a rotation."""
    return samples[: max(batch, len(samples) // 4)]


def per_layer_widths(spectra_of, layers: int, width: int, d: int, cfg) -> list[int]:
    """Width of every residual boundary (embeddings' output, then after each attention and each MLP block): d each,
    or (schedule = spectrum) chosen from each boundary's eigen-spectrum in the folded model with the same total.
    `spectra_of()` returns the 2 * layers + 1 boundaries' eigenvalues, descending. The last boundary (the head's
    input) stays at full width unless slice_head."""
    n = 2 * layers + (1 if cfg.slice_head else 0)
    widths = [d] * n
    if cfg.schedule == "spectrum":
        from compressor.passes.slicegpt.slice_schedule import spectrum_widths

        spectra = spectra_of()[:n]
        low = max(cfg.round_to, d - (width - d) // cfg.round_to * cfg.round_to)
        widths = spectrum_widths(spectra, d, cfg.round_to, low, width // cfg.round_to * cfg.round_to)
    return widths + [width] * (2 * layers + 1 - n)


def slice_per_layer(adapter, samples: torch.Tensor, d: int, cfg) -> tuple[float, list[int]]:
    """per_layer mode on calibration samples: the boundaries' widths, then `slice_boundaries`. Returns the mean
    fraction of variance kept over the boundaries, and the widths."""
    width = adapter.config.hidden_size
    widths = per_layer_widths(lambda: boundary_spectra(adapter, some(samples, cfg.batch), cfg.batch),
                              len(adapter.layers), width, d, cfg)
    kept: list[float] = []
    slice_boundaries(adapter, torch.split(samples, cfg.batch), widths, pca_keeping(cfg.damping, kept), cfg.normalize_tokens)
    return float(sum(kept) / len(kept)), widths
