"""Whisper (speech): the encoder turns 30 s of log-mel frames into 1500 audio tokens; the decoder reads them through
cross-attention and writes the transcript.

The encoder fits the shared block shape (pre-LN: self_attn_layer_norm, q/k/v/o with no key bias, final_layer_norm,
fc1/GELU/fc2), so the token plan merges audio frames exactly as it merges patches. Every frame is NORMAL: Whisper
pads audio with silence and attends to it (it is not masked), so the silence frames are what ToMe merges first in
practice, by similarity, not by rule. The encoder's output is the whole sequence with its sizes (`pool` is the
size-weighted mean only for probing); the decoder (compressor.program.speech) adds log(size) to its cross-attention logits.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import NORMAL, InputSpec, multi_head_attention
from .capabilities import EncoderLayer, SpeechAdapter


class WhisperLayerAdapter(EncoderLayer):
    def __init__(self, layer: nn.Module, head_dim: int):
        super().__init__(layer, head_dim)
        att = layer.self_attn
        self.q, self.k, self.v, self.o = att.q_proj, att.k_proj, att.v_proj, att.out_proj
        self.norm1, self.norm2 = layer.self_attn_layer_norm, layer.final_layer_norm
        self.fc_in, self.fc_out, self.act = layer.fc1, layer.fc2, layer.activation_fn

    def attention(self, x, bias):
        att = multi_head_attention(self.norm1(x), self.q, self.k, self.v, self.heads, bias)
        return att._replace(x=self.residual(x, "attn") + self.o(att.x))

    def mlp(self, x):
        return self.residual(x, "mlp") + self.fc_out(self.act(self.fc_in(self.norm2(x))))


class WhisperAdapter(SpeechAdapter):
    """Speech: token_merge only (`SpeechAdapter.supported_passes`), so no pruning or slicing interface."""

    family = "whisper"
    modality = "audio"
    model_types = ("whisper",)
    auto_class = "WhisperForConditionalGeneration"
    norm_placement = "pre"
    protected_per_sample = 0  # no class token: every audio frame may merge
    supported_passes = ("token_merge",)  # the speech artifact carries a token plan; structural passes are not wired
    examples = ("example:whisper-base", "openai/whisper-base")  # multilingual checkpoints: the prefix names <|en|>

    def __init__(self, model, folder):
        super().__init__(model, folder)
        self._wrap_layers()

    @property
    def encoder(self) -> nn.Module:
        """transformers' audio encoder (conv stem, positions, the blocks `layers` wraps, final layer norm)."""
        return self.model.model.encoder

    @property
    def decoder(self) -> nn.Module:
        return self.model.model.decoder

    @property
    def blocks(self):
        return self.encoder.layers

    def make_layer(self, block):
        return WhisperLayerAdapter(block, self.config.d_model // self.config.encoder_attention_heads)

    @property
    def num_frames(self) -> int:
        """Mel frames in one window (3000 for 30 s at a 10 ms hop)."""
        return 2 * self.config.max_source_positions

    def input_specs(self, shapes):
        return [InputSpec("input_features", (shapes["batch"], self.config.num_mel_bins, self.num_frames), "float32")]

    def num_tokens(self, shapes):
        return self.config.max_source_positions  # conv2 has stride 2

    def embed(self, input_features):
        enc = self.encoder
        x = nn.functional.gelu(enc.conv1(input_features))
        x = nn.functional.gelu(enc.conv2(x)).transpose(1, 2)
        x = x + enc.embed_positions.weight[: x.shape[1]]
        kinds = torch.full(x.shape[:2], NORMAL, dtype=torch.long)
        return x, kinds

    def final_norm(self, x):
        return self.encoder.layer_norm(x)

    def pool(self, x, size, kinds):
        """The mean over the 1500 input frames (a merged token counts `size` times): the one vector per clip that the
        pass manager probes and capture counts FLOPs on. The artifact's encoder (compressor.program.speech)
        outputs the whole sequence with its sizes instead."""
        return (x * size).sum(1) / size.sum(1)

    def reference_forward(self, input_features):
        return self.encoder(input_features).last_hidden_state.mean(1)

    def preprocess_config(self, shapes):
        return {"kind": "speech", "sampling_rate": 16000, "n_fft": 400, "hop_length": 160,
                "num_mel_bins": self.config.num_mel_bins, "num_frames": self.num_frames}

    def artifact_files(self):
        return ["tokenizer.json"]

    def describe(self):
        out = super().describe()
        c = self.config
        out.update(hidden_size=c.d_model, heads=c.encoder_attention_heads, decoder_layers=c.decoder_layers)
        return out
