"""The adapter contract (models/base.py, models/capabilities.py): every registered family is a concrete
`ModelAdapter` that declares its capabilities by inheritance, an incomplete family cannot be instantiated, and the
decoder program runs any `DecoderAdapter`, not only Llama's."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from compressor.models import (ADAPTERS, DecoderAdapter, DecoderLayer, DepthPrunable, EncoderAdapter, EncoderLayer,
                               HeadPrunable, LlamaAdapter, LlamaLikeAdapter, ModelAdapter, SliceableAdapter,
                               SliceableLayer, SpeechAdapter, WidthPrunable)

INTERFACES = (EncoderAdapter, DecoderAdapter, SpeechAdapter, HeadPrunable, WidthPrunable, DepthPrunable, SliceableAdapter)
PRUNABLE = {HeadPrunable, WidthPrunable, DepthPrunable}  # width_prune (heads, channels) and layer_prune
# what each family's passes need: token_merge/token_prune/learned_rates an encoder, the LM path a decoder, width_prune
# and layer_prune the pruning interfaces, slicegpt SliceableAdapter; Whisper takes token_merge only
EXPECTED = {
    **dict.fromkeys(("bert", "roberta", "distilbert", "mpnet", "vit", "deit", "clip"), {EncoderAdapter} | PRUNABLE),
    "dinov2": {EncoderAdapter, SliceableAdapter} | PRUNABLE,
    **dict.fromkeys(("llama", "qwen2", "qwen3", "mistral", "phi3"), {DecoderAdapter, SliceableAdapter} | PRUNABLE),
    "gemma3": {DecoderAdapter} | PRUNABLE,  # post-block norms: no SliceGPT
    "whisper": {EncoderAdapter, SpeechAdapter},
}


def declared(cls) -> set[type]:
    return {i for i in INTERFACES if issubclass(cls, i)}


@pytest.mark.parametrize("cls", ADAPTERS, ids=lambda c: c.__name__)
def test_registered_adapters_are_concrete_model_adapters(cls):
    assert issubclass(cls, ModelAdapter) and not inspect.isabstract(cls), cls.__abstractmethods__
    assert cls.family and cls.model_types and cls.modality


@pytest.mark.parametrize("cls", ADAPTERS, ids=lambda c: c.__name__)
def test_each_family_declares_the_interfaces_its_passes_need(cls):
    assert declared(cls) == EXPECTED[cls.family]
    assert (cls.modality == "causal_lm") == issubclass(cls, DecoderAdapter)
    assert (cls.modality == "audio") == issubclass(cls, SpeechAdapter)
    assert issubclass(cls, EncoderAdapter) != issubclass(cls, DecoderAdapter)  # one program runs it
    assert (cls.supported_passes is not None) == issubclass(cls, SpeechAdapter)
    stand_in = cls.__new__(cls)  # class attributes only, as `compress models` reads them
    assert (stand_in.slicing_refusal == "") == issubclass(cls, SliceableAdapter)
    if issubclass(cls, EncoderAdapter):
        assert stand_in.pooling in ("mean", "cls")
        assert stand_in.has_class_token == (cls.modality == "image")  # text reads its pooling from the folder


def test_capabilities_are_declared_attributes_not_probes():
    """What stages used to read with getattr has a documented default on the base or the interface."""
    assert ModelAdapter.supported_passes is None and ModelAdapter.examples == ()
    assert EncoderAdapter.pooling == "mean" and isinstance(EncoderAdapter.output_size, property)
    assert DecoderLayer.post_attn_norm is None and DecoderLayer.q_norm is None and DecoderLayer.sliding_window is None
    assert issubclass(LlamaAdapter, LlamaLikeAdapter) and not issubclass(LlamaLikeAdapter, SliceableAdapter)


class _Config:
    hidden_size, num_attention_heads = 8, 2


class _Model(nn.Module):
    config = _Config()


def _encoder_methods() -> dict:
    return {"blocks": property(lambda self: nn.ModuleList()), "make_layer": lambda self, b: None,
            "input_specs": lambda self, s: [], "num_tokens": lambda self, s: 0, "preprocess_config": lambda self, s: {},
            "embed": lambda self, *x: None, "final_norm": lambda self, x: x, "pool": lambda self, x, s, k: x,
            "reference_forward": lambda self, *x: None}


def test_a_complete_adapter_instantiates():
    Complete = type("Complete", (EncoderAdapter, HeadPrunable, WidthPrunable, DepthPrunable), _encoder_methods())
    ad = Complete(_Model(), "folder")
    assert ad.output_size == 8 and not ad.has_class_token and isinstance(ad, HeadPrunable)


@pytest.mark.parametrize("missing", ["blocks", "input_specs", "preprocess_config", "embed", "pool", "reference_forward"])
def test_an_incomplete_encoder_raises_type_error(missing):
    methods = _encoder_methods()
    del methods[missing]
    Incomplete = type("Incomplete", (EncoderAdapter,), methods)
    assert inspect.isabstract(Incomplete)
    with pytest.raises(TypeError, match=missing):
        Incomplete(_Model(), "folder")


@pytest.mark.parametrize("base, expected", [
    (ModelAdapter, {"blocks", "make_layer", "input_specs", "num_tokens", "preprocess_config"}),
    (DecoderAdapter, {"blocks", "make_layer", "embed_tokens", "final_norm_module", "lm_head", "rotaries"}),
    (SpeechAdapter, {"decoder", "num_frames"}),
    (SliceableAdapter, {"fold_norms", "residual_norms", "head_readers", "calibration_forward", "embed_stream",
                        "stream_context", "block_write", "rotate_embeddings", "set_sliced_norm", "record_sliced_width"}),
])
def test_each_interface_names_what_a_family_must_write(base, expected):
    assert expected <= base.__abstractmethods__
    with pytest.raises(TypeError):
        base(_Model(), "folder")
    with pytest.raises(TypeError):
        type("Empty", (base,), {})(_Model(), "folder")


def test_an_incomplete_layer_raises_type_error():
    with pytest.raises(TypeError, match="attention"):
        type("NoAttention", (EncoderLayer,), {"mlp": lambda self, x: x})(nn.Identity(), 4)
    with pytest.raises(TypeError, match="mlp_out"):
        type("NoMlpOut", (DecoderLayer,), {"mlp": lambda self, x: x, "attn_out": lambda self, c: c})(nn.Identity(), 4)
    with pytest.raises(TypeError, match="residual_writers"):
        type("NoWriters", (SliceableLayer,), {"mlp": lambda self, x: x,
                                              "residual_readers": property(lambda self: {})})(nn.Identity(), 4)


# ------------------------------------------------------------------ a decoder that is not Llama's adapter


class TinyDecoderLayer(DecoderLayer):
    def __init__(self, block, head_dim):
        super().__init__(block, head_dim)
        att, mlp = block.self_attn, block.mlp
        self.q, self.k, self.v, self.o = att.q_proj, att.k_proj, att.v_proj, att.o_proj
        self.gate, self.up, self.act, self.fc_out = mlp.gate_proj, mlp.up_proj, mlp.act_fn, mlp.down_proj
        self.fc_in = self.up
        self.attn_norm, self.mlp_norm = block.input_layernorm, block.post_attention_layernorm

    def attn_out(self, ctx):
        return self.o(ctx)

    def mlp_out(self, x):
        h = self.mlp_norm(x)
        return self.fc_out(self.act(self.gate(h)) * self.up(h))

    def mlp(self, x):
        return x + self.mlp_out(x)


class TinyDecoderAdapter(DecoderAdapter):
    """A DecoderAdapter written from the interface alone (no Llama base class)."""

    family = "tiny"
    model_types = ("tiny",)

    def __init__(self, model, folder):
        super().__init__(model, folder)
        self.head_dim = self.config.hidden_size // self.config.num_attention_heads
        self._wrap_layers()

    blocks = property(lambda self: self.model.model.layers)
    embed_tokens = property(lambda self: self.model.model.embed_tokens)
    final_norm_module = property(lambda self: self.model.model.norm)
    lm_head = property(lambda self: self.model.lm_head)
    rotaries = property(lambda self: {None: self.model.model.rotary_emb})

    def make_layer(self, block):
        return TinyDecoderLayer(block, self.head_dim)


def test_decoder_program_runs_any_decoder_adapter():
    from transformers import LlamaConfig, LlamaForCausalLM

    from compressor.program.decoder import DecoderProgram, prefill_inputs

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ad = TinyDecoderAdapter(model, "unused")
    assert not isinstance(ad, (LlamaLikeAdapter, SliceableAdapter, HeadPrunable))
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        logits, *present = DecoderProgram(ad)(*prefill_inputs(ad, ids))
        ref = model(input_ids=ids).logits
    assert torch.allclose(logits, ref, atol=1e-5)
    assert len(present) == 4 and present[0].shape == (2, 2, 8, 8)  # the dummy slot, then 7 tokens
    assert [s.name for s in ad.input_specs({})][:3] == ["input_ids", "attention_mask", "past_key_values.0.key"]
    assert ad.preprocess_config({})["kv_heads"] == [2, 2]
