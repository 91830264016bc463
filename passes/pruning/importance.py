"""Importance of attention heads and MLP channels, measured where they meet the residual stream: the input of the
attention output projection (heads, head after head) and of the MLP output projection (channels).

- `fisher` (Kwon et al. 2022): a mask of ones multiplies each head and channel; the importance of a mask entry is
  the mean squared gradient of the model's log-likelihood under its own predictions, i.e. the diagonal of the Fisher
  information, which is the Hessian of a distillation loss against the dense model at the dense model. No labels:
  language models sample the next token from their own distribution; encoders take the gradient of a random
  projection e . f(x) of the pooled output (e ~ N(0, I)), whose squared gradient is, in expectation, the Gauss-Newton
  diagonal of the squared-error distillation loss. Per sample, so samples' terms do not cancel.
- `activation` (FLAP's fluctuation): variance of the unit's input over calibration tokens times the squared norm of
  the output-projection column(s) it feeds, relative to the mean squared norm of the residual stream entering the
  block: the next norm divides by that, so a write matters by its size relative to the stream (without this, the
  global ranking strips the early blocks of pre-norm language models, whose stream is small).
- `magnitude`: weights only (a baseline to show what the data-driven metrics add): the activation score with each
  unit's input energy stood in for by the squared norm of the weights that produce it (value rows, fc_in rows).
Activation and magnitude scores of heads and channels are both energies written to the residual stream, so they
rank on one scale; Fisher scores are all loss curvatures.
The same pass collects, per projection, the sum, sum of squares and (for least-squares compensation) the Gram matrix
of its inputs over real tokens, from the dense model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from compressor.pipeline.progress import track

from .calibration import real_tokens, walk


@dataclass
class InputStats:
    """Statistics of one projection's input over real calibration tokens (float64)."""

    count: int = 0
    total: torch.Tensor | None = None
    squares: torch.Tensor | None = None
    gram: torch.Tensor | None = None

    def add(self, x: torch.Tensor, with_gram: bool) -> None:
        x = x.detach()
        s, q = x.double().sum(0), (x.double() ** 2).sum(0)
        self.total = s if self.total is None else self.total + s
        self.squares = q if self.squares is None else self.squares + q
        if with_gram:
            g = (x.T @ x).double()  # float32 per batch, accumulated in float64
            self.gram = g if self.gram is None else self.gram + g
        self.count += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def variance(self) -> torch.Tensor:
        return (self.squares / self.count - self.mean ** 2).clamp(min=0)


@dataclass
class Calibrated:
    heads: list[InputStats] = field(default_factory=list)  # input of each block's attention output projection
    channels: list[InputStats] = field(default_factory=list)  # input of each block's MLP output projection
    stream: list[float] = field(default_factory=list)  # mean squared norm of the residual stream entering each block
    head_fisher: list[torch.Tensor] = field(default_factory=list)
    channel_fisher: list[torch.Tensor] = field(default_factory=list)
    samples: int = 0


def calibrate(handle, batches, fisher: bool, gram: bool, seed: int = 0) -> Calibrated:
    """One pass over the calibration batches: input statistics of every output projection and, with `fisher`,
    the squared mask gradients (one sample at a time)."""
    layers = handle.adapter.layers
    out = Calibrated([InputStats() for _ in layers], [InputStats() for _ in layers], [0.0] * len(layers))
    tokens_seen = 0
    head_masks = [torch.ones(l.heads, requires_grad=fisher) for l in layers]
    channel_masks = [torch.ones(l.channels, requires_grad=fisher) for l in layers]
    out.head_fisher = [torch.zeros(l.heads, dtype=torch.float64) for l in layers]
    out.channel_fisher = [torch.zeros(l.channels, dtype=torch.float64) for l in layers]
    state = {"tokens": None}

    def hook(stats: InputStats, mask: torch.Tensor, repeat: int):
        def pre(_module, args):
            x = args[0]
            stats.add(x.reshape(-1, x.shape[-1])[state["tokens"]], gram)
            return (x * mask.repeat_interleave(repeat),)
        return pre

    handles = []
    for i, l in enumerate(layers):
        handles.append(l.o.register_forward_pre_hook(hook(out.heads[i], head_masks[i], l.head_dim)))
        handles.append(l.fc_out.register_forward_pre_hook(hook(out.channels[i], channel_masks[i], 1)))
    g = torch.Generator().manual_seed(seed)
    try:
        for batch in track(batches, "calibrating (batches)"):
            singles = zip(*(t.split(1) for t in batch)) if fisher else [batch]
            for inputs in singles:
                state["tokens"] = real = real_tokens(handle, inputs).reshape(-1)
                with torch.set_grad_enabled(fisher):  # Fisher needs gradients even when called under no_grad
                    w = walk(handle, inputs, keep_states=True)
                    loss = _fisher_objective(handle, w.output, g) if fisher else None
                for i, x in enumerate(w.states[:-1]):
                    out.stream[i] += float((x.detach().reshape(-1, x.shape[-1])[real].double() ** 2).sum())
                tokens_seen += int(real.sum())
                if loss is None:
                    continue
                grads = torch.autograd.grad(loss, head_masks + channel_masks)
                for acc, gr in zip(out.head_fisher + out.channel_fisher, grads):
                    acc.add_(gr.double() ** 2)
                out.samples += 1
    finally:
        for h in handles:
            h.remove()
    out.stream = [e / max(tokens_seen, 1) for e in out.stream]
    return out


def _fisher_objective(handle, output: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A scalar whose squared gradient estimates the Fisher diagonal (see the module docstring)."""
    if handle.target.decoder:
        logits = output[0].float()
        sampled = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=g)
        return torch.log_softmax(logits, -1).gather(-1, sampled).sum()
    return (output * torch.randn(output.shape, generator=g)).sum()


def head_scores(handle, cal: Calibrated, importance: str) -> list[torch.Tensor]:
    """Importance of every head of every block (higher matters more)."""
    out = []
    for i, layer in enumerate(handle.adapter.layers):
        hd = layer.head_dim
        if importance == "fisher":
            out.append(cal.head_fisher[i] / max(cal.samples, 1))
            continue
        w_o = layer.o.weight.double()
        if importance == "activation":
            per_channel = cal.heads[i].variance * (w_o ** 2).sum(0) / cal.stream[i]
        else:  # as activation, with each channel's input energy stood in for by its value projection's weights
            group = layer.heads // layer.kv_heads
            value = (layer.v.weight.double() ** 2).sum(1).view(layer.kv_heads, hd).repeat_interleave(group, 0).reshape(-1)
            per_channel = value * (w_o ** 2).sum(0)
        out.append(per_channel.view(layer.heads, hd).sum(1))
    return out


def channel_scores(handle, cal: Calibrated, importance: str) -> list[torch.Tensor]:
    """Importance of every MLP channel of every block (higher matters more)."""
    out = []
    for i, layer in enumerate(handle.adapter.layers):
        if importance == "fisher":
            out.append(cal.channel_fisher[i] / max(cal.samples, 1))
            continue
        column = (layer.fc_out.weight.double() ** 2).sum(0)
        if importance == "activation":
            out.append(cal.channels[i].variance * column / cal.stream[i])
        else:
            out.append(column * sum((r.weight.double() ** 2).sum(1) for r in layer.channel_readers))
    return out
