"""Capability interfaces: what a family offers beyond `ModelAdapter`, declared by inheritance and tested with
`isinstance` (passes and stages never probe an adapter with getattr).

    EncoderAdapter    runs in the token-plan encoder program (compressor.program.encoder): token_merge, token_prune,
                      learned_rates, the encoder artifact
    DecoderAdapter    runs in the causal-LM program (compressor.program.decoder) and the fused lowering
    SpeechAdapter     an EncoderAdapter whose artifact also carries a text decoder (compressor.program.speech)
    HeadPrunable      width_prune removes attention heads
    WidthPrunable     width_prune removes MLP channels
    DepthPrunable     layer_prune removes whole blocks
    SliceableAdapter  slicegpt rotates and slices the residual stream

Each abstract method is one a family must write for the capability; the others carry the shared implementation.
The layer side has the same split: `EncoderLayer`, `DecoderLayer`, `SliceableLayer` over `LayerAdapter`.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import Attended, InputSpec, LayerAdapter, ModelAdapter, remove_heads_hf, sync_intermediate_size

# tokenizer files a causal LM's artifact carries (where the folder has them)
DECODER_TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]


# ---------------------------------------------------------------------------------------------------- layers


class EncoderLayer(LayerAdapter):
    """A block the encoder program runs as `attention`, then the token plan, then `mlp`."""

    @abstractmethod
    def attention(self, x: torch.Tensor, bias: torch.Tensor) -> Attended:
        """The block up to the merge point (residual and, post-LN, norm included): the token plan acts on its `x`,
        ranks by its `metric` (merging) or `probs` (pruning)."""


class DecoderLayer(LayerAdapter):
    """A pre-norm decoder block with rotary grouped-query attention and a gated MLP, as the decoder program runs it
    and the fused lowering writes it: h = attn_norm(x); x += attn_out(attention(h)); x = mlp(x).

    Besides the parts `LayerAdapter` names (q, k, v, o, fc_out), a family's `__init__` sets `attn_norm`, `mlp_norm`,
    `gate`, `up` and `act`; the optional parts below default to absent.
    """

    attn_norm: nn.Module  # RMSNorm before attention
    mlp_norm: nn.Module  # RMSNorm before the MLP
    gate: nn.Linear  # the MLP computes fc_out(act(gate(h)) * up(h))
    up: nn.Linear
    act: nn.Module
    q_norm: nn.Module | None = None  # per-head RMSNorm of queries and keys before rotary (Qwen3, Gemma 3)
    k_norm: nn.Module | None = None
    post_attn_norm: nn.Module | None = None  # a norm on the attention output before the residual add (Gemma 3)
    post_mlp_norm: nn.Module | None = None  # and on the MLP output
    rope: Hashable = None  # which of the adapter's `rotaries` this block's attention uses
    sliding_window: int | None = None  # keys further back than this many slots are masked; None: full attention

    @property
    def attn_scale(self) -> float:
        """What the query-key logits are multiplied by (the program and GroupQueryAttention's `scale`)."""
        return 1.0 / math.sqrt(self.head_dim)

    @abstractmethod
    def attn_out(self, ctx: torch.Tensor) -> torch.Tensor:
        """The attention context written to the residual stream (o, then `post_attn_norm` where there is one)."""

    @abstractmethod
    def mlp_out(self, x: torch.Tensor) -> torch.Tensor:
        """What the MLP adds to the residual stream x (norm included, residual not): SliceGPT and `mlp` build on it."""


class SliceableLayer(LayerAdapter):
    """A block whose residual-stream readers and writers SliceGPT rotates."""

    @property
    @abstractmethod
    def residual_readers(self) -> dict[str, list[nn.Linear]]:
        """Linears that read the residual stream, keyed by the attribute name of the norm in front of them (the
        attention's group, then the MLP's): SliceGPT folds each norm into its readers and rotates their inputs."""

    @property
    @abstractmethod
    def residual_writers(self) -> list[nn.Linear]:
        """The attention's and the MLP's output projections: SliceGPT rotates and slices their outputs."""

    def writer_sliced(self, writer: nn.Linear) -> None:
        """`writer` now writes fewer directions of the stream: resize whatever scales its write on the way (DINOv2's
        layer scale); nothing by default."""


# ---------------------------------------------------------------------------------------------------- programs


class EncoderAdapter(ModelAdapter):
    """Inputs to one pooled vector, through `compressor.program.encoder.EncoderProgram`: embed, then each block's
    attention, token plan and MLP, then final_norm and pool. Its `layers` are `EncoderLayer`s."""

    pooling: str = "mean"  # how `pool` reads the output: "cls" (the class token) or "mean"; text reads its folder's

    @abstractmethod
    def embed(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs to (hidden states (B, N, C), token kinds (B, N)): the program starts from them, merging never mixes kinds."""

    @abstractmethod
    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The norm after the last block (identity where pooling applies it): the program's hidden output."""

    @abstractmethod
    def pool(self, x: torch.Tensor, size: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        """One vector per sample from the final hidden states, merged tokens weighted by `size`: the program's output."""

    @abstractmethod
    def reference_forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The pooled output computed by the unmodified transformers model: the ground truth for tests and validation."""

    @property
    def output_size(self) -> int:
        """Width of the pooled output (the manifest's output shape): the hidden size unless a projection follows (CLIP)."""
        return self.config.hidden_size

    @property
    def has_class_token(self) -> bool:
        """The output is read from a class token at position 0 (vision CLS, text pooled by CLS): what class-token
        attention pruning needs."""
        return self.protected_per_sample >= 1 and self.pooling == "cls"


class SpeechAdapter(EncoderAdapter):
    """A speech seq2seq model: the encoder runs as an `EncoderAdapter` (with a token plan), and the artifact also
    carries the text decoder (compressor.program.speech: encoder, cross keys/values, decoder step)."""

    modality = "audio"
    protected_per_sample = 0  # no class token: every audio frame may merge
    supported_passes = ("token_merge",)  # the speech artifact carries a token plan; structural passes are not wired

    @property
    @abstractmethod
    def decoder(self) -> nn.Module:
        """transformers' text decoder (embed_tokens, embed_positions, layers with self_attn/encoder_attn/fc1/fc2,
        layer_norm): the decoder and cross-attention programs run its modules."""

    @property
    @abstractmethod
    def num_frames(self) -> int:
        """Input frames of one window: the feature extractor pads or cuts audio to it."""


class DecoderAdapter(ModelAdapter):
    """A causal language model, through `compressor.program.decoder` (prefill and decode in one graph, past
    key/values in and out) and the fused lowering; its `layers` are `DecoderLayer`s.

    A family gives the modules below and sets `head_dim` in `__init__`; shapes, feeds, the runtime's configuration
    and the logits follow from them.
    """

    modality = "causal_lm"
    auto_class = "AutoModelForCausalLM"
    head_dim: int  # per-head width of queries, keys and values (set by __init__: it is not always hidden / heads)

    @property
    @abstractmethod
    def embed_tokens(self) -> nn.Embedding:
        """Token ids to the residual stream: the program's first step, and the table a tied LM head shares."""

    @property
    @abstractmethod
    def final_norm_module(self) -> nn.Module:
        """The norm after the last block: the program, SliceGPT's folding and the lowering read it."""

    @property
    @abstractmethod
    def lm_head(self) -> nn.Linear:
        """Hidden states to vocabulary logits: the program's last step; SliceGPT rotates it, quantisation packs it."""

    @property
    @abstractmethod
    def rotaries(self) -> dict[Any, nn.Module]:
        """Rotary modules keyed by `DecoderLayer.rope`, called as rotary(x, positions) -> (cos, sin): the program and
        the lowering build their tables from them (so rope scaling is whatever transformers computes)."""

    @property
    def kv_heads(self) -> list[int]:
        """Key/value heads of every block (they differ after width pruning removed whole groups unevenly): the shapes
        of the past and present key/values."""
        return [l.kv_heads for l in self.layers]

    @property
    def embed_scale(self) -> Any:
        """A factor the embedding module applies in its forward (Gemma: sqrt(hidden)), None where there is none: the
        fused lowering writes it as a Mul after its Gather."""
        return None

    @property
    def logit_softcap(self) -> float | None:
        """c in logits = tanh(logits / c) * c (Gemma), None where logits are not capped: `logits` and the lowering apply it."""
        return None

    @property
    def tokenizer_file(self) -> Path:
        """The fast tokenizer: calibration text, validation and the artifact are tokenised with it."""
        return Path(self.folder) / "tokenizer.json"

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head on the final norm (soft-capped where `logit_softcap` is set)."""
        logits = self.lm_head(self.final_norm_module(x))
        cap = self.logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def reference_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """transformers' own forward: the ground truth for tests and distillation's teacher."""
        return self.model(input_ids=input_ids).logits

    def num_tokens(self, shapes):
        return shapes["seq_len"]

    def input_specs(self, shapes):
        b = "batch"  # one graph for every batch, prompt and cache length
        specs = [InputSpec("input_ids", (b, "sequence"), "int64"), InputSpec("attention_mask", (b, "total"), "int64")]
        for i in range(len(self.layers)):
            for kind in ("key", "value"):
                specs.append(InputSpec(f"past_key_values.{i}.{kind}", (b, self.kv_heads[i], "past", self.head_dim), "float32"))
        return specs

    def preprocess_config(self, shapes):
        c = self.config
        eos = c.eos_token_id if isinstance(c.eos_token_id, list) else [c.eos_token_id]
        return {"kind": "causal_lm", "tokenizer": "tokenizer.json", "eos_token_ids": [int(e) for e in eos if e is not None],
                "bos_token_id": c.bos_token_id, "num_layers": len(self.layers), "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "vocab_size": c.vocab_size}

    def artifact_files(self):
        return [f for f in DECODER_TOKENIZER_FILES if (Path(self.folder) / f).exists()]

    def describe(self):
        out = super().describe()
        kv = self.kv_heads
        out.update(kv_heads=kv[0] if len(set(kv)) == 1 else kv,
                   vocab_size=self.config.vocab_size, tied_embeddings=self.lm_head.weight is self.embed_tokens.weight)
        windows = [l.sliding_window for l in self.layers]
        if any(w is not None for w in windows):
            out["sliding_window"] = windows[0] if len(set(windows)) == 1 else windows
        return out


# ---------------------------------------------------------------------------------------------------- structure


class HeadPrunable(ModelAdapter):
    """width_prune may remove attention heads: each block's `LayerAdapter.keep_heads` (or transformers' own
    `prune_heads` where `hf_head_pruning`) rewrites q/k/v rows and o columns."""

    def keep_heads(self, index: int, kept: list[int]) -> None:
        """Keep these heads of block `index` (indices into its current heads). Where transformers can prune heads
        itself, through its `prune_heads`, so `config.pruned_heads` records them and the folder reloads."""
        if not self.hf_head_pruning:
            self.layers[index].keep_heads(sorted(kept))
            return
        gone = [h for h in range(self.layers[index].heads) if h not in set(kept)]
        remove_heads_hf(self.model, self.blocks[index].attention, index, gone, self.config.num_attention_heads)
        self._layers[index] = self.make_layer(self.blocks[index])


class WidthPrunable(ModelAdapter):
    """width_prune may remove MLP channels; the config follows so that the pruned folder reloads."""

    intermediate_key: str = "intermediate_size"  # the config entry that sets the MLP width

    def keep_channels(self, index: int, kept: list[int]) -> None:
        """Keep these MLP channels of block `index` (indices into its current channels)."""
        self.layers[index].keep_channels(sorted(kept))

    def sync_config(self) -> None:
        """Write uniform per-block sizes (MLP channels; heads where the config holds them) into the config after
        structured pruning, so `save_pretrained` writes a folder that reloads."""
        sync_intermediate_size(self, self.intermediate_key)


class DepthPrunable(ModelAdapter):
    """layer_prune may delete whole blocks; the config and whatever the family keys by block index follow."""

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


class SliceableAdapter(ModelAdapter):
    """slicegpt may rotate the residual stream by Q (readers by Q, writers by Q^T) and slice its width: the family
    says how its norms fold, where its embeddings, norms and head sit and how to step through its blocks. Its
    `layers` are `SliceableLayer`s."""

    slicing_refusal = ""

    @abstractmethod
    def fold_norms(self) -> None:
        """Make every norm on the residual stream a weightless RMS norm, which commutes with a rotation, without
        changing the outputs: scales (and biases) fold into the linears that read the norms."""

    @property
    @abstractmethod
    def residual_norms(self) -> list[nn.Module]:
        """The (folded) norms whose inputs are the residual boundaries, in order (each block's two, then the final
        one): the pass hooks them to measure the stream and rescales them after slicing."""

    @property
    @abstractmethod
    def head_readers(self) -> list[nn.Linear]:
        """Linears that read the final norm's output (the LM head; DINOv2's output projection): rotated like readers."""

    @abstractmethod
    def calibration_forward(self, batch: torch.Tensor) -> None:
        """Run the model on a calibration batch so that hooks on `residual_norms` see every boundary (PCA input)."""

    @abstractmethod
    def embed_stream(self, batch: torch.Tensor) -> torch.Tensor:
        """The residual stream at its first boundary (the embeddings' output): per_layer mode starts its walk there."""

    @abstractmethod
    def stream_context(self, x: torch.Tensor) -> Any:
        """What `block_write` needs beside the stream x (rotary tables and masks; an attention bias)."""

    @abstractmethod
    def block_write(self, layer: SliceableLayer, block: str, x: torch.Tensor, context) -> torch.Tensor:
        """What `layer`'s block ("attn" or "mlp") adds to the residual stream x (its output less the residual):
        per_layer mode measures each boundary block by block from it."""

    @abstractmethod
    def rotate_embeddings(self, q: torch.Tensor) -> None:
        """Write the embeddings in the rotated basis, keeping its first q.shape[1] directions."""

    @abstractmethod
    def set_sliced_norm(self, norm: nn.Module, width: int, d: int) -> None:
        """Make `norm` (folded, weightless, over `width`) act on a d-dim slice of the rotated stream: the same RMS
        needs a scale sqrt(width / d) and epsilon * width / d."""

    @abstractmethod
    def record_sliced_width(self, width: int, d: int) -> None:
        """After portable slicing (one rotation, every boundary at d): write the new width where the family keeps it,
        so the folder reloads."""
