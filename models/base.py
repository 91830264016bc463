"""Family adapters: where a model family keeps its embeddings, blocks, attention q/k/v/o, MLP and norms.

Passes rewrite weights and structure through these adapters; the static-shape program (`compressor.program.encoder`) runs a
block as `attention` then `mlp`, so a pass such as token merging can act between the two without patching the
model's own forward. Each family's block math is written against the transformers version the project pins.

To add a family (docs/adding-a-family.md builds one from scratch):
1. In models/<family>.py, a `LayerAdapter` subclass names one block's parts (q, k, v, o, fc_in, fc_out, its norms)
   and its math: `EncoderLayer.attention` and `mlp`, or `DecoderLayer`'s `attn_out` and `mlp_out`.
2. A `ModelAdapter` subclass sets `family`, `modality`, `model_types` and implements the abstract methods of
   `ModelAdapter` and of each capability interface it inherits (models/capabilities.py): `EncoderAdapter` or
   `DecoderAdapter` (which program runs it), `HeadPrunable`, `WidthPrunable`, `DepthPrunable` (width_prune,
   layer_prune), `SliceableAdapter` (slicegpt), `SpeechAdapter`. Passes test capabilities with `isinstance`; a
   class that misses an abstract method cannot be instantiated (TypeError), so a gap shows on load, not mid-pass.
3. Reuse the closest family instead where only options differ (Mistral is LlamaAdapter plus two attributes).
4. Append the class to `ADAPTERS` in models/__init__.py and test it against transformers' own forward.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

# Token kinds carried beside the hidden states: merging never mixes kinds.
NORMAL, PROTECTED, PAD = 0, 1, 2


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name


class Attended(NamedTuple):
    """What a block's attention hands to the token plan: its output and what merging and pruning rank tokens by."""

    x: torch.Tensor  # (B, N, C) the hidden states after attention (residual and, post-LN, norm included)
    metric: torch.Tensor  # (B, N, C/heads) keys averaged over heads: ToMe's and PiToMe's similarity
    probs: torch.Tensor  # (B, heads, N, N) softmax attention probabilities: pruning's importance


def multi_head_attention(x: torch.Tensor, q: nn.Linear, k: nn.Linear, v: nn.Linear, heads: int, bias: torch.Tensor) -> Attended:
    """Plain softmax attention with an additive per-key bias (padding mask, log token size).

    Returns the context (B, N, C) as `x`, the keys averaged over heads and the per-head probabilities (already
    computed, so nothing extra lands in the graph unless the token plan reads them). Written out as matmul +
    softmax so it lowers to plain ONNX ops at static shapes.
    """
    return biased_attention(x, q, k, v, heads, bias[:, None, None, :])


def biased_attention(x: torch.Tensor, q: nn.Linear, k: nn.Linear, v: nn.Linear, heads: int, bias: torch.Tensor) -> Attended:
    """`multi_head_attention` with a bias broadcastable to (B, heads, N, N) instead of a per-key one."""
    b, n, _ = x.shape
    hd = q.out_features // heads
    qh = q(x).view(b, n, heads, hd).transpose(1, 2)
    kh = k(x).view(b, n, heads, hd).transpose(1, 2)
    vh = v(x).view(b, n, heads, hd).transpose(1, 2)
    logits = (qh @ kh.transpose(-1, -2)) * (1.0 / math.sqrt(hd)) + bias
    probs = logits.softmax(dim=-1)
    ctx = probs @ vh
    return Attended(ctx.transpose(1, 2).reshape(b, n, heads * hd), kh.mean(dim=1), probs)


class LayerAdapter(ABC):
    """One transformer block: named access to its parts and its math split at the merge point.

    Head and channel counts are read from the weights, so a block keeps working after structured pruning made it
    narrower than its neighbours. What a program runs besides `mlp` is on `EncoderLayer` / `DecoderLayer`
    (models/capabilities.py); what SliceGPT rotates is on `SliceableLayer`.
    """

    def __init__(self, layer: nn.Module, head_dim: int):
        self.layer = layer
        self.head_dim = head_dim

    # named parts, for passes that rewrite weights
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    fc_in: nn.Linear
    fc_out: nn.Linear

    @property
    def heads(self) -> int:
        return self.q.out_features // self.head_dim

    @property
    def kv_heads(self) -> int:
        return self.k.out_features // self.head_dim

    @property
    def channels(self) -> int:
        """MLP intermediate channels."""
        return self.fc_out.in_features

    @property
    def channel_readers(self) -> list[nn.Linear]:
        """Linears whose output rows are the MLP's intermediate channels (fc_in; gate and up for gated MLPs)."""
        return [self.fc_in]

    def keep_channels(self, kept: list[int]) -> None:
        """Keep these MLP intermediate channels (indices into the current ones), in this order."""
        idx = torch.as_tensor(kept, dtype=torch.long)
        for lin in self.channel_readers:
            keep_rows(lin, idx)
        keep_columns(self.fc_out, idx)

    def keep_heads(self, kept: list[int]) -> None:
        """Keep these query heads (indices into the current ones); a family with grouped keys/values overrides it."""
        rows = head_rows(kept, self.head_dim)
        for lin in (self.q, self.k, self.v):
            keep_rows(lin, rows)
        keep_columns(self.o, rows)

    @abstractmethod
    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP block with its residual (and, post-LN, its norm): both programs and every block walk call it."""

    def shortcut(self, block: str) -> nn.Module | None:
        """SliceGPT's shortcut matrix on the residual path around a block ("attn" or "mlp"), None where there is none
        (the identity): the programs and the fused lowering apply it."""
        return getattr(self.layer, f"{block}_shortcut", None)

    def residual(self, x: torch.Tensor, block: str) -> torch.Tensor:
        """The residual path around a block ("attn" or "mlp"): identity, or SliceGPT's shortcut matrix between the
        rotations before and after it (per_layer mode)."""
        shortcut = self.shortcut(block)
        return x if shortcut is None else shortcut(x)


def head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    """Row indices of these heads in a projection laid out head after head."""
    return torch.as_tensor([h * head_dim + j for h in heads for j in range(head_dim)], dtype=torch.long)


@torch.no_grad()
def keep_rows(lin: nn.Linear, idx: torch.Tensor) -> None:
    """Keep these output features (rows of the weight, entries of the bias)."""
    lin.weight = nn.Parameter(lin.weight[idx].contiguous(), requires_grad=False)
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias[idx].contiguous(), requires_grad=False)
    lin.out_features = len(idx)


@torch.no_grad()
def keep_columns(lin: nn.Linear, idx: torch.Tensor) -> None:
    """Keep these input features (columns of the weight)."""
    lin.weight = nn.Parameter(lin.weight[:, idx].contiguous(), requires_grad=False)
    lin.in_features = len(idx)


def remove_heads_hf(model: nn.Module, attention: nn.Module, index: int, heads: list[int], heads_in_config: int) -> None:
    """Remove heads (indices into the block's current heads) with transformers' own `prune_heads`, which records
    them in `config.pruned_heads` (original indices) so that `from_pretrained` rebuilds the same shapes."""
    alive = sorted(set(range(heads_in_config)) - set(attention.pruned_heads))
    model.prune_heads({index: [alive[h] for h in heads]})
    for p in model.parameters():
        p.requires_grad_(False)


def sync_intermediate_size(adapter: "ModelAdapter", key: str = "intermediate_size") -> None:
    """Uniform MLP widths go into the config (`key`), so the folder reloads; mixed widths are left to the manifest."""
    widths = {l.channels for l in adapter.layers}
    if len(widths) != 1:
        return
    (c,) = widths
    if key == "mlp_ratio":  # ViT families: int(hidden * mlp_ratio) must give c back exactly
        adapter.config.mlp_ratio = (c + 0.5) / adapter.config.hidden_size
    else:
        setattr(adapter.config, key, c)


class ModelAdapter(ABC):
    """A model family: what every family implements, whatever its modality and whichever passes it takes.

    Subclasses set `family`, `modality`, `model_types` and `protected_per_sample`, implement the abstract methods
    below and inherit the capability interfaces (models/capabilities.py) whose passes they support.
    """

    family: str = ""
    title: str = ""  # the family's name in prose, for messages (family if empty)
    modality: str = ""  # "text", "image", "causal_lm" or "audio": the kind of data, shapes and artifact it takes
    model_types: tuple[str, ...] = ()  # transformers' config.model_type values the family loads
    examples: tuple[str, ...] = ()  # checkpoints `compress models` lists (empty: the CLI's own table)
    protected_per_sample: int = 1  # tokens that never merge, counted for schedule caps
    auto_class: str = "AutoModel"  # the transformers class that loads the folder
    norm_placement: str = "post"  # "pre" (norm before attention/MLP) or "post" (after the residual add)
    non_stock: str = ""  # set by a pass whose rewrite stock transformers cannot express: why the model is not reloadable
    hf_head_pruning: bool = False  # transformers implements prune_heads (config.pruned_heads) for this family
    # the passes this family takes, where it restricts them (a speech model: its export carries a token plan only);
    # None: every pass whose `requires` its capabilities meet
    supported_passes: tuple[str, ...] | None = None

    def __init__(self, model: nn.Module, folder):
        self.model = model
        self.folder = folder
        self.config = model.config

    @property
    def layers(self) -> list[LayerAdapter]:
        return self._layers

    @property
    @abstractmethod
    def blocks(self) -> nn.ModuleList:
        """The model's own list of transformer blocks: what `layers` wraps and layer removal deletes from."""

    @abstractmethod
    def make_layer(self, block: nn.Module) -> LayerAdapter:
        """Wrap one block in the family's `LayerAdapter`: every pass reaches weights through it."""

    def _wrap_layers(self) -> None:
        self._layers = [self.make_layer(b) for b in self.blocks]

    @property
    def uniform_blocks(self) -> bool:
        """Every block has the same sizes (heads only matter where the config, not pruned_heads, holds them)."""
        same = lambda values: len(set(values)) <= 1  # noqa: E731
        if not same(l.channels for l in self.layers):
            return False
        return self.hf_head_pruning or (same(l.heads for l in self.layers) and same(l.kv_heads for l in self.layers))

    @property
    def transformers_loadable(self) -> bool:
        """Whether `save_pretrained` of the current model reloads with stock transformers (no shortcut matrices,
        no per-block sizes the config cannot express, nothing a pass marked as non-stock)."""
        return not (self.non_stock or not self.uniform_blocks or self.has_shortcuts)

    @property
    def has_shortcuts(self) -> bool:
        """SliceGPT's per_layer mode added shortcut matrices (rotations between neighbouring blocks)."""
        return any("shortcut" in name for name, _ in self.model.named_parameters())

    @abstractmethod
    def input_specs(self, shapes: dict) -> list[InputSpec]:
        """The exported graph's inputs at these compile shapes: export, feeds and the manifest are built from them."""

    @abstractmethod
    def num_tokens(self, shapes: dict) -> int:
        """Tokens entering the first block at these shapes: token schedules and FLOPs budgets count from it."""

    def prepare(self, shapes: dict) -> None:
        """Precompute shape-specific constants eagerly, before any capture (tracing must not create them)."""

    @abstractmethod
    def preprocess_config(self, shapes: dict) -> dict:
        """What the runtime needs to turn raw inputs into feeds (stored in the artifact)."""

    def artifact_files(self) -> list[str]:
        """Files from the model folder that the artifact carries for pre-processing (tokenizer files)."""
        return []

    @property
    def slicing_refusal(self) -> str:
        """Why SliceGPT cannot rotate this family's residual stream, in one line; "" where it can (`SliceableAdapter`)."""
        if self.norm_placement != "pre":
            return (f"slicegpt needs a pre-norm model; {self.family} normalises after each residual add (post-norm), "
                    "so a rotation of the residual stream cannot pass through its norms (computational invariance breaks)")
        return f"slicegpt supports Llama-family decoders (Llama, Qwen2, Qwen3, Mistral, Phi-3) and DINOv2 so far, not {self.family}"

    def describe(self) -> dict:
        c = self.config
        out = {
            "family": self.family,
            "modality": self.modality,
            "layers": len(self.layers),
            "hidden_size": c.hidden_size,
            "heads": c.num_attention_heads,
            "params": sum(p.numel() for p in self.model.parameters()),
            "transformers_loadable": self.transformers_loadable,
        }
        heads, channels = [l.heads for l in self.layers], [l.channels for l in self.layers]
        if len(set(heads)) > 1 or heads and heads[0] != c.num_attention_heads:
            out["heads_per_layer"] = heads
        if len(set(channels)) > 1:
            out["channels_per_layer"] = channels
        elif channels:
            out["intermediate_size"] = channels[0]
        return out
