"""SliceGPT's view of DINOv2 (pre-LayerNorm, layer scale): what no public SliceGPT implementation does.

LayerNorm is not rotation-invariant, but on a zero-mean stream it reduces to an RMS norm. So: every write to the
residual stream (patch embedding, CLS token, position embedding, attention and MLP outputs) is centred; layer scale
folds into the writers; each norm's scale and bias fold into the linears that read it; the norms become weightless
RMS norms. The outputs are unchanged (a test checks it). The final norm's scale and bias become a projection after
it (`OutputHead`), which slicing turns into a small d -> D projection on the CLS token (d = D when per_layer leaves
the last boundary unsliced), so the embedding keeps its width and meaning.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .capabilities import SliceableAdapter


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
    """The final LayerNorm of a folded model: RMS norm on the stream, then back to the full width with scale and bias."""

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


class Dinov2Slicing(SliceableAdapter):
    """The `SliceableAdapter` interface of `Dinov2Adapter`."""

    @torch.no_grad()
    def fold_norms(self) -> None:
        """Centre every write to the stream, fold layer scale into writers and norm affine into readers."""
        model, width = self.model, self.config.hidden_size
        eps = self.config.layer_norm_eps
        emb = model.embeddings
        emb.cls_token.copy_(emb.cls_token - emb.cls_token.mean(-1, keepdim=True))
        emb.position_embeddings.copy_(emb.position_embeddings - emb.position_embeddings.mean(-1, keepdim=True))
        proj = emb.patch_embeddings.projection
        proj.weight.copy_(_center(proj.weight))
        proj.bias.copy_(proj.bias - proj.bias.mean())
        for layer in self.layers:
            for norm_name, readers in layer.residual_readers.items():
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
        self.refresh_positions()
        self.non_stock = "SliceGPT centred DINOv2's residual stream and folded its LayerNorms"

    @property
    def residual_norms(self) -> list[nn.Module]:
        return [m for layer in self.layers for m in (layer.norm1, layer.norm2)] + [self.model.layernorm.norm]

    @property
    def head_readers(self) -> list[nn.Linear]:
        return [self.model.layernorm.proj]

    def calibration_forward(self, pixels: torch.Tensor) -> None:
        """The blocks, then the final norm on every token (the embedding reads the CLS token alone)."""
        x = self.embed(pixels)[0]
        bias = torch.zeros(x.shape[:2])
        for layer in self.layers:
            x = layer.mlp(layer.attention(x, bias)[0])
        self.model.layernorm(x)

    def embed_stream(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.embed(pixels)[0]

    def stream_context(self, x: torch.Tensor):
        """The attention bias of unmerged tokens."""
        return torch.zeros(x.shape[:2])

    def block_write(self, layer, block, x, context):
        return layer.attention_out(x, context)[0] if block == "attn" else layer.mlp_out(x)

    def rotate_embeddings(self, q: torch.Tensor) -> None:
        """CLS token and position embeddings are rows of the stream; the patch projection writes it."""
        emb, dtype = self.model.embeddings, q.dtype
        d, width = q.shape[1], q.shape[0]
        emb.cls_token = _param(emb.cls_token.to(dtype) @ q)
        emb.position_embeddings = _param(emb.position_embeddings.to(dtype) @ q)
        proj = emb.patch_embeddings.projection
        w = proj.weight.to(dtype).reshape(width, -1)
        proj.weight = _param((q.T @ w).reshape(d, *proj.weight.shape[1:]))
        proj.bias = _param(q.T @ proj.bias.to(dtype))
        proj.out_channels = d
        self.refresh_positions()

    def set_sliced_norm(self, norm: ScaledRMSNorm, width: int, d: int) -> None:
        norm.dim, norm.scale, norm.eps = d, math.sqrt(width / d), self.config.layer_norm_eps * width / d

    def record_sliced_width(self, width: int, d: int) -> None:
        """Nothing: the config keeps the embedding's width, which the output projection restores."""
