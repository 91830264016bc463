"""Family adapters: where a model family keeps its embeddings, blocks, attention q/k/v/o, MLP and norms.

Passes rewrite weights and structure through these adapters; the static-shape program (`compressor.program.encoder`) runs a
block as `attention` then `mlp`, so a pass such as token merging can act between the two without patching the
model's own forward. Each family's block math is written against the transformers version the project pins.
"""

from __future__ import annotations

import math
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


class LayerAdapter:
    """One transformer block: named access to its parts and its math split at the merge point.

    Head and channel counts are read from the weights, so a block keeps working after structured pruning made it
    narrower than its neighbours.
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

    def attention(self, x: torch.Tensor, bias: torch.Tensor) -> Attended:
        """The block up to the merge point: `Attended` with x the hidden states after attention."""
        raise NotImplementedError

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def residual(self, x: torch.Tensor, block: str) -> torch.Tensor:
        """The residual path around a block ("attn" or "mlp"): identity, or SliceGPT's shortcut matrix between the
        rotations before and after it (per_layer mode)."""
        shortcut = getattr(self.layer, f"{block}_shortcut", None)
        return x if shortcut is None else shortcut(x)

    # SliceGPT (passes/slicegpt) rotates the residual stream: where this block reads and writes it
    @property
    def residual_readers(self) -> dict[str, list[nn.Linear]]:
        """Linears that read the residual stream, keyed by the attribute name of the norm in front of them: the
        attention's group, then the MLP's."""
        raise NotImplementedError

    @property
    def residual_writers(self) -> list[nn.Linear]:
        """The attention's and the MLP's output projections: the linears that write the residual stream."""
        raise NotImplementedError

    def writer_sliced(self, writer: nn.Linear) -> None:
        """`writer` now writes fewer directions of the stream: resize whatever scales its write on the way (DINOv2's
        layer scale); nothing by default."""


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


class ModelAdapter:
    """A model family. Subclasses set `family`, `modality`, `model_types` and `protected_per_sample`."""

    family: str = ""
    modality: str = ""  # "text", "image", "causal_lm" or "audio"
    model_types: tuple[str, ...] = ()
    protected_per_sample: int = 1  # tokens that never merge, counted for schedule caps
    auto_class: str = "AutoModel"  # the transformers class that loads the folder
    norm_placement: str = "post"  # "pre" (norm before attention/MLP) or "post" (after the residual add)
    non_stock: str = ""  # set by a pass whose rewrite stock transformers cannot express: why the model is not reloadable
    hf_head_pruning: bool = False  # transformers implements prune_heads (config.pruned_heads) for this family
    intermediate_key: str = "intermediate_size"  # the config entry that sets the MLP width

    def __init__(self, model: nn.Module, folder):
        self.model = model
        self.folder = folder
        self.config = model.config

    @property
    def layers(self) -> list[LayerAdapter]:
        return self._layers

    @property
    def blocks(self) -> nn.ModuleList:
        """The model's own list of transformer blocks."""
        raise NotImplementedError

    def make_layer(self, block: nn.Module) -> LayerAdapter:
        raise NotImplementedError

    def _wrap_layers(self) -> None:
        self._layers = [self.make_layer(b) for b in self.blocks]

    def keep_heads(self, index: int, kept: list[int]) -> None:
        """Keep these heads of block `index` (indices into its current heads). Where transformers can prune heads
        itself, through its `prune_heads`, so `config.pruned_heads` records them and the folder reloads."""
        if not self.hf_head_pruning:
            self.layers[index].keep_heads(sorted(kept))
            return
        gone = [h for h in range(self.layers[index].heads) if h not in set(kept)]
        remove_heads_hf(self.model, self.blocks[index].attention, index, gone, self.config.num_attention_heads)
        self._layers[index] = self.make_layer(self.blocks[index])

    def keep_channels(self, index: int, kept: list[int]) -> None:
        """Keep these MLP channels of block `index` (indices into its current channels)."""
        self.layers[index].keep_channels(sorted(kept))

    def remove_layers(self, indices: list[int]) -> None:
        """Delete whole blocks (ShortGPT / SLEB); the config and per-block bookkeeping follow."""
        drop, total = set(indices), len(self.blocks)
        for i in sorted(drop, reverse=True):
            del self.blocks[i]  # in place: the ModuleList stays registered where the model keeps it
        self.config.num_hidden_layers = len(self.blocks)
        self._renumber_layers([i for i in range(total) if i not in drop])
        self._wrap_layers()

    def _renumber_layers(self, old_index: list[int]) -> None:
        """After removal, block i was block old_index[i]: fix what a family keys by block index."""
        pruned = getattr(self.config, "pruned_heads", None) or {}
        if pruned:
            self.config.pruned_heads = {new: pruned[old] for new, old in enumerate(old_index) if old in pruned}

    def sync_config(self) -> None:
        """Write uniform per-block sizes (MLP channels; heads where the config holds them) into the config after
        structured pruning, so `save_pretrained` writes a folder that reloads."""
        sync_intermediate_size(self, self.intermediate_key)

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
    def has_class_token(self) -> bool:
        """The output is read from a class token at position 0 (vision CLS, text pooled by CLS): what class-token
        attention pruning needs."""
        if self.protected_per_sample < 1:
            return False
        return self.modality == "image" or getattr(self, "pooling", None) == "cls"

    @property
    def has_shortcuts(self) -> bool:
        """SliceGPT's per_layer mode added shortcut matrices (rotations between neighbouring blocks)."""
        return any("shortcut" in name for name, _ in self.model.named_parameters())

    def input_specs(self, shapes: dict) -> list[InputSpec]:
        raise NotImplementedError

    def num_tokens(self, shapes: dict) -> int:
        raise NotImplementedError

    def prepare(self, shapes: dict) -> None:
        """Precompute shape-specific constants eagerly, before any capture (tracing must not create them)."""

    def embed(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs to (hidden states (B, N, C), token kinds (B, N))."""
        raise NotImplementedError

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pool(self, x: torch.Tensor, size: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reference_forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The pooled output computed by the unmodified transformers model: the ground truth for tests."""
        raise NotImplementedError

    def preprocess_config(self, shapes: dict) -> dict:
        """What the runtime needs to turn raw inputs into feeds (stored in the artifact)."""
        raise NotImplementedError

    def artifact_files(self) -> list[str]:
        """Files from the model folder that the artifact carries for pre-processing (tokenizer files)."""
        return []

    # SliceGPT (passes/slicegpt): the pass rotates readers by Q, writers by Q^T and slices; a family that supports
    # it says here how its norms fold, where its embeddings, norms and head sit and how to step through its blocks
    title: str = ""  # the family's name in prose, for messages (family if empty)

    @property
    def slicing_refusal(self) -> str:
        """Why SliceGPT cannot rotate this family's residual stream, in one line; "" where it can."""
        if self.norm_placement != "pre":
            return (f"slicegpt needs a pre-norm model; {self.family} normalises after each residual add (post-norm), "
                    "so a rotation of the residual stream cannot pass through its norms (computational invariance breaks)")
        return f"slicegpt supports Llama-family decoders (Llama, Qwen2, Qwen3, Mistral, Phi-3) and DINOv2 so far, not {self.family}"

    def fold_norms(self) -> None:
        """Make every norm on the residual stream a weightless RMS norm, which commutes with a rotation, without
        changing the outputs: scales (and biases) fold into the linears that read the norms."""
        raise NotImplementedError

    @property
    def residual_norms(self) -> list[nn.Module]:
        """The (folded) norms whose inputs are the residual boundaries, in order: each block's two, then the final one."""
        raise NotImplementedError

    @property
    def head_readers(self) -> list[nn.Linear]:
        """Linears that read the final norm's output (the LM head; DINOv2's output projection)."""
        raise NotImplementedError

    def calibration_forward(self, batch: torch.Tensor) -> None:
        """Run the model on a calibration batch so that hooks on `residual_norms` see every boundary."""
        raise NotImplementedError

    def embed_stream(self, batch: torch.Tensor) -> torch.Tensor:
        """The residual stream at its first boundary (the embeddings' output) for a calibration batch."""
        raise NotImplementedError

    def stream_context(self, x: torch.Tensor):
        """What `block_write` needs beside the stream x (rotary tables and masks; an attention bias)."""
        raise NotImplementedError

    def block_write(self, layer: LayerAdapter, block: str, x: torch.Tensor, context) -> torch.Tensor:
        """What `layer`'s block ("attn" or "mlp") adds to the residual stream x (its output less the residual)."""
        raise NotImplementedError

    def rotate_embeddings(self, q: torch.Tensor) -> None:
        """Write the embeddings in the rotated basis, keeping its first q.shape[1] directions."""
        raise NotImplementedError

    def set_sliced_norm(self, norm: nn.Module, width: int, d: int) -> None:
        """Make `norm` (folded, weightless, over `width`) act on a d-dim slice of the rotated stream: the same RMS
        needs a scale sqrt(width / d) and epsilon * width / d."""
        raise NotImplementedError

    def record_sliced_width(self, width: int, d: int) -> None:
        """After portable slicing (one rotation, every boundary at d): write the new width where the family keeps it."""
        raise NotImplementedError

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
