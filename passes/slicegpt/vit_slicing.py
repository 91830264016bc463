"""SliceGPT for pre-LayerNorm vision transformers (DINOv2): what no public SliceGPT implementation does.

LayerNorm is not rotation-invariant, but on a zero-mean stream it reduces to an RMS norm. So: every write to the
residual stream (patch embedding, CLS token, position embedding, attention and MLP outputs) is centred; layer scale
folds into the writers; each norm's scale and bias fold into the linears that read it; the norms become weightless
RMS norms. The outputs are unchanged (a test checks it). The stream is then rotated by PCA and sliced: by one
rotation (portable mode) or by one per residual boundary with shortcut matrices between them (per_layer mode). The
final norm's scale and bias, with the inverse rotation, become a small d -> D projection on the CLS token (d = D
when per_layer leaves the last boundary unsliced), so the embedding keeps its width and meaning.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from compressor.passes.slicegpt.pca import normalized_spectrum, second_moment


class ScaledRMSNorm(nn.Module):
    """x * scale / sqrt(mean(x^2) + eps): a weightless RMS norm over a wider stream acting on a slice of it."""

    def __init__(self, dim: int, scale: float = 1.0, eps: float = 1e-6):
        super().__init__()
        self.dim, self.scale, self.eps = dim, scale, eps

    def forward(self, x):
        return x * (self.scale * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def extra_repr(self):
        return f"{self.dim}, scale={self.scale:.4f}, eps={self.eps:.3g}"


class OutputHead(nn.Module):
    """The final LayerNorm of a sliced model: RMS norm on the slice, then back to the full width with scale and bias."""

    def __init__(self, norm: ScaledRMSNorm, proj: nn.Linear):
        super().__init__()
        self.norm, self.proj = norm, proj

    def forward(self, x):
        return self.proj(self.norm(x))


def _center(w: torch.Tensor) -> torch.Tensor:
    """Remove the mean over the output (first) dimension: the written vectors then sum to zero."""
    return w - w.mean(dim=0, keepdim=True)


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.contiguous().float(), requires_grad=False)


@torch.no_grad()
def fold_layernorms(adapter) -> None:
    """Centre every write to the stream, fold layer scale into writers and norm affine into readers."""
    model, width = adapter.model, adapter.config.hidden_size
    eps = adapter.config.layer_norm_eps
    emb = model.embeddings
    emb.cls_token.copy_(emb.cls_token - emb.cls_token.mean(-1, keepdim=True))
    emb.position_embeddings.copy_(emb.position_embeddings - emb.position_embeddings.mean(-1, keepdim=True))
    proj = emb.patch_embeddings.projection
    proj.weight.copy_(_center(proj.weight))
    proj.bias.copy_(proj.bias - proj.bias.mean())
    for layer in adapter.layers:
        for norm_name, readers in (("norm1", [layer.q, layer.k, layer.v]), ("norm2", [layer.fc_in])):
            norm = getattr(layer, norm_name)
            for lin in readers:
                lin.bias.copy_(lin.bias + lin.weight @ norm.bias)
                lin.weight.mul_(norm.weight[None, :])
            rms = ScaledRMSNorm(width, 1.0, eps)
            setattr(layer.layer, norm_name, rms)
            setattr(layer, norm_name, rms)
        for writer, scale in ((layer.o, layer.scale1), (layer.fc_out, layer.scale2)):
            writer.weight.copy_(_center(writer.weight * scale.lambda1[:, None]))
            writer.bias.copy_(_center((writer.bias * scale.lambda1)[:, None])[:, 0])
            scale.lambda1 = _param(torch.ones(width))
    final = model.layernorm
    head = nn.Linear(width, width)
    head.weight = _param(torch.diag(final.weight))
    head.bias = _param(final.bias.clone())
    model.layernorm = OutputHead(ScaledRMSNorm(width, 1.0, final.eps), head)
    adapter.refresh_positions()


def _boundaries(adapter, pixel_batches):
    """The residual stream at every boundary (the embedding's output, after each attention, after each MLP), for
    all calibration batches at once, walked block by block: one boundary's activations at a time."""
    xs = [adapter.embed(p)[0] for p in pixel_batches]
    yield xs
    for layer in adapter.layers:
        xs = [layer.attention(x, torch.zeros(x.shape[:2]))[0] for x in xs]
        yield xs
        xs = [layer.mlp(x) for x in xs]
        yield xs


@torch.no_grad()
def stream_second_moment(adapter, pixel_batches, normalize: bool) -> torch.Tensor:
    """Sum of x x^T (float64) over every token of the calibration images at every residual boundary together
    (portable mode's one rotation)."""
    return sum(second_moment(x, normalize) for xs in _boundaries(adapter, pixel_batches) for x in xs)


@torch.no_grad()
def boundary_spectra_vit(adapter, pixel_batches) -> list[torch.Tensor]:
    """Eigenvalues (descending) of the per-token normalised second moment at every residual boundary."""
    return [normalized_spectrum(xs) for xs in _boundaries(adapter, pixel_batches)]


def _rotate_embeddings(emb, q: torch.Tensor) -> None:
    """Write the embeddings (CLS token, position embeddings, patch projection) in the first d rotated directions."""
    qd = q.double()
    d, width = q.shape[1], q.shape[0]
    emb.cls_token = _param(emb.cls_token.double() @ qd)
    emb.position_embeddings = _param(emb.position_embeddings.double() @ qd)
    proj = emb.patch_embeddings.projection
    w = proj.weight.double().reshape(width, -1)
    proj.weight = _param((qd.T @ w).reshape(d, *proj.weight.shape[1:]))
    proj.bias = _param(qd.T @ proj.bias.double())
    proj.out_channels = d


def _read_from(lin: nn.Linear, q: torch.Tensor) -> None:
    lin.weight = _param(lin.weight.double() @ q.double())
    lin.in_features = q.shape[1]


def _write_to(lin: nn.Linear, scale: nn.Module, q: torch.Tensor) -> None:
    lin.weight = _param(q.double().T @ lin.weight.double())
    lin.bias = _param(q.double().T @ lin.bias.double())
    lin.out_features = q.shape[1]
    scale.lambda1 = _param(torch.ones(q.shape[1]))


def _sliced_norm(width: int, d: int, eps: float) -> ScaledRMSNorm:
    """A weightless RMS norm over `width` acting on a d-dim slice of the rotated stream."""
    return ScaledRMSNorm(d, math.sqrt(width / d), eps * width / d)


@torch.no_grad()
def slice_per_layer_vit(adapter, pixel_batches, widths: list[int], pca, normalize: bool) -> None:
    """SliceGPT's per_layer mode on a folded DINOv2: a PCA rotation per residual boundary, computed from the
    already-sliced upstream model one block at a time, with shortcut matrices Q_a^T Q_b on the residual paths.

    `widths` holds the 2 * layers + 1 boundary widths (embedding output, after each attention, after each MLP);
    `pca(moment, keep)` returns the first `keep` eigenvectors (width x keep) of a second moment (of per-token
    normalised activations with `normalize`). The last boundary feeds the final
    norm, whose scale and bias with the inverse rotation become the d -> width projection on the CLS token.
    """
    model, width = adapter.model, adapter.config.hidden_size
    eps = adapter.config.layer_norm_eps
    xs = [adapter.embed(p)[0] for p in pixel_batches]
    q = pca(sum(second_moment(x, normalize) for x in xs), widths[0])
    _rotate_embeddings(model.embeddings, q)
    adapter.refresh_positions()
    xs = [x @ q for x in xs]
    for j, layer in enumerate(adapter.layers):
        for k, block in enumerate(("attn", "mlp")):
            norm_name = "norm1" if block == "attn" else "norm2"
            norm = _sliced_norm(width, q.shape[1], eps)
            setattr(layer.layer, norm_name, norm)
            setattr(layer, norm_name, norm)
            readers, writer, scale = ([layer.q, layer.k, layer.v], layer.o, layer.scale1) if block == "attn" else \
                ([layer.fc_in], layer.fc_out, layer.scale2)
            for lin in readers:
                _read_from(lin, q)
            ys = []
            for x in xs:
                out = layer.attention_out(x, torch.zeros(x.shape[:2]))[0] if block == "attn" else layer.mlp_out(x)
                ys.append(x @ q.T + out)  # the block's output in the original (unrotated) basis
            q_next = pca(sum(second_moment(y, normalize) for y in ys), widths[2 * j + 1 + k])
            shortcut = nn.Linear(q.shape[1], q_next.shape[1], bias=False)
            shortcut.weight = _param((q.T @ q_next).T)
            setattr(layer.layer, f"{block}_shortcut", shortcut)
            _write_to(writer, scale, q_next)
            xs = [y @ q_next for y in ys]
            q = q_next
    head = model.layernorm
    proj = nn.Linear(q.shape[1], width)
    proj.weight = _param(head.proj.weight.double() @ q.double())
    proj.bias = head.proj.bias
    model.layernorm = OutputHead(_sliced_norm(width, q.shape[1], eps), proj)


@torch.no_grad()
def rotate_and_slice_vit(adapter, q: torch.Tensor, d: int) -> None:
    """Portable mode: one rotation for the whole stream, keep its first d directions everywhere."""
    model, width = adapter.model, adapter.config.hidden_size
    eps = adapter.config.layer_norm_eps
    qd = q[:, :d]
    _rotate_embeddings(model.embeddings, qd)
    for layer in adapter.layers:
        for lin in (layer.q, layer.k, layer.v, layer.fc_in):
            _read_from(lin, qd)
        for lin, scale in ((layer.o, layer.scale1), (layer.fc_out, layer.scale2)):
            _write_to(lin, scale, qd)
        for name in ("norm1", "norm2"):
            rms = _sliced_norm(width, d, eps)
            setattr(layer.layer, name, rms)
            setattr(layer, name, rms)
    head = model.layernorm
    new_proj = nn.Linear(d, width)
    new_proj.weight = _param(head.proj.weight.double() @ qd.double())
    new_proj.bias = head.proj.bias
    model.layernorm = OutputHead(_sliced_norm(width, d, eps), new_proj)
    adapter.refresh_positions()
