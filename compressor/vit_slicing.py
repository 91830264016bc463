"""SliceGPT for pre-LayerNorm vision transformers (DINOv2): what no public SliceGPT implementation does.

LayerNorm is not rotation-invariant, but on a zero-mean stream it reduces to an RMS norm. So: every write to the
residual stream (patch embedding, CLS token, position embedding, attention and MLP outputs) is centred; layer scale
folds into the writers; each norm's scale and bias fold into the linears that read it; the norms become weightless
RMS norms. The outputs are unchanged (a test checks it). The stream is then rotated by one PCA rotation and sliced;
the final norm's scale and bias, with the inverse rotation, become a small d -> D projection on the CLS token, so
the embedding keeps its width and meaning.
"""

from __future__ import annotations

import math

import torch
from torch import nn


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


@torch.no_grad()
def stream_second_moment(adapter, pixel_batches, normalize: bool) -> torch.Tensor:
    """Second moment of the residual stream at every norm's input, over every token of the calibration images."""
    width = adapter.model.embeddings.cls_token.shape[-1]
    acc = torch.zeros(width, width, dtype=torch.float64)

    def add(x):
        x = x.reshape(-1, width).float()
        if normalize:
            x = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        acc.add_((x.T @ x).double())

    for pixels in pixel_batches:
        x, _ = adapter.embed(pixels)
        bias = torch.zeros(x.shape[:2])
        for layer in adapter.layers:
            add(x)
            x, _ = layer.attention(x, bias)
            add(x)
            x = layer.mlp(x)
        add(x)
    return acc


@torch.no_grad()
def rotate_and_slice_vit(adapter, q: torch.Tensor, d: int) -> None:
    model, width = adapter.model, adapter.config.hidden_size
    eps = adapter.config.layer_norm_eps
    qd = q[:, :d].double()
    emb = model.embeddings
    emb.cls_token = _param(emb.cls_token.double() @ qd)
    emb.position_embeddings = _param(emb.position_embeddings.double() @ qd)
    proj = emb.patch_embeddings.projection
    w = proj.weight.double().reshape(width, -1)
    proj.weight = _param((qd.T @ w).reshape(d, *proj.weight.shape[1:]))
    proj.bias = _param(qd.T @ proj.bias.double())
    proj.out_channels = d
    for layer in adapter.layers:
        for lin in (layer.q, layer.k, layer.v, layer.fc_in):
            lin.weight = _param(lin.weight.double() @ qd)
            lin.in_features = d
        for lin, scale in ((layer.o, layer.scale1), (layer.fc_out, layer.scale2)):
            lin.weight = _param(qd.T @ lin.weight.double())
            lin.bias = _param(qd.T @ lin.bias.double())
            lin.out_features = d
            scale.lambda1 = _param(torch.ones(d))
        for name in ("norm1", "norm2"):
            rms = ScaledRMSNorm(d, math.sqrt(width / d), eps * width / d)
            setattr(layer.layer, name, rms)
            setattr(layer, name, rms)
    head = model.layernorm
    new_proj = nn.Linear(d, width)
    new_proj.weight = _param(head.proj.weight.double() @ qd)
    new_proj.bias = head.proj.bias
    model.layernorm = OutputHead(ScaledRMSNorm(d, math.sqrt(width / d), eps * width / d), new_proj)
    adapter.refresh_positions()
