"""distill on encoders: a damaged MiniLM or DINOv2 moves back towards the dense model on held-out calibration inputs,
ends frozen in eval mode, still captures, and refuses language-model options."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from compressor.errors import UsageError
from compressor.program.handle import load
from compressor.pipeline.context import PassContext
from compressor.pipeline.pass_manager import Pipeline
from compressor.passes import Distill, TokenMerge
from compressor.passes.distill import encode

from .conftest import SMALL_IMAGE, SMALL_TEXT

pytestmark = pytest.mark.slow  # distillation runs (training steps) on the real encoders

# warm-up over half the steps: Adam's first, sign-like step at the full rate can cost more than a few steps recover
SMALL_DISTILL = {"steps": 8, "batch": 2, "samples": 16, "eval_samples": 8, "warmup": 0.5}


def assert_frozen_plain(handle) -> None:
    ad = handle.adapter
    assert not ad.model.training
    assert all(type(p) is torch.nn.Parameter and not p.requires_grad for p in ad.model.parameters())


def test_token_merged_minilm_recovers():
    """The student trains through its token plan; the held-out loss and cosine to the dense model improve."""
    handle = load("example:minilm", **SMALL_TEXT)
    before = {n: p.clone() for n, p in handle.adapter.model.named_parameters()}
    Pipeline([TokenMerge(r=12), Distill(**SMALL_DISTILL)]).run(handle)  # captures after training: export still works
    x = handle.example_inputs()
    with torch.no_grad():  # the loss reads the same forward the program runs
        assert torch.equal(encode(handle.program(), x).pooled, handle.program()(*x))
    info = handle.history[-1]["info"]
    assert info["steps"] == 8 and info["inputs"] == 16 and info["device"].startswith("cpu") and info["hidden_term"]
    assert info["lr"] == 1e-5 and not info["restored"]
    assert info["eval_loss_after"] < info["eval_loss_before"]
    assert info["eval_cosine_after"] > info["eval_cosine_before"]
    assert_frozen_plain(handle)
    changed = [n for n, p in handle.adapter.model.named_parameters() if not torch.equal(p, before[n])]
    assert any(".layer.0." in n for n in changed) and any("embeddings" in n for n in changed)
    assert handle.plan.merges and handle.history[-1]["params_after"] == handle.history[-1]["params_before"]


def test_channel_pruned_dinov2_recovers_blocks_only():
    """Three quarters of the MLP channels of six blocks removed; train = "blocks" leaves the embeddings alone."""
    handle = load("example:dinov2-small", **SMALL_IMAGE)
    ad = handle.adapter
    for i in range(6):
        ad.keep_channels(i, list(range(0, ad.layers[i].channels, 4)))
    ad.sync_config()
    embeddings = {n: p.clone() for n, p in ad.model.embeddings.named_parameters()}
    p = Distill(**SMALL_DISTILL, train="blocks")
    p.check(handle)
    info = p.run(handle, PassContext.for_handle(handle)).info
    assert info["hidden_term"] and not info["restored"] and info["eval_loss_after"] < info["eval_loss_before"]
    assert info["eval_cosine_after"] > info["eval_cosine_before"]
    assert info["trained_params"] == sum(q.numel() for q in ad.blocks.parameters())
    assert all(torch.equal(q, embeddings[n]) for n, q in ad.model.embeddings.named_parameters())
    assert ad.layers[0].channels == ad.layers[6].channels // 4  # the architecture is kept
    assert_frozen_plain(handle)


def test_a_worse_student_is_restored():
    """A learning rate that wrecks the model: the pass reports it and puts the weights it found back."""
    handle = load("example:minilm", **SMALL_TEXT)
    TokenMerge(r=8).run(handle, PassContext.for_handle(handle))
    before = {n: p.clone() for n, p in handle.adapter.model.named_parameters()}
    info = Distill(steps=2, batch=2, samples=4, eval_samples=4, lr=0.5, warmup=0.0).run(handle, PassContext.for_handle(handle)).info
    assert info["restored"] and info["eval_loss_after"] > info["eval_loss_before"]
    assert all(torch.equal(p, before[n]) for n, p in handle.adapter.model.named_parameters())
    assert_frozen_plain(handle)


def test_options_of_the_other_kind_are_refused():
    from compressor.targets import target_for

    encoder = SimpleNamespace(adapter=SimpleNamespace(modality="text", family="bert"), capabilities={"text", "encoder"},
                              target=target_for("text"))
    lm = SimpleNamespace(adapter=SimpleNamespace(modality="causal_lm", family="llama"),
                         capabilities={"causal_lm", "decoder"}, target=target_for("causal_lm"))
    Distill().check(encoder)
    Distill().check(lm)
    with pytest.raises(UsageError, match="seq_len, temperature apply to language models only"):
        Distill(seq_len=64, temperature=2.0).check(encoder)
    with pytest.raises(UsageError, match="samples apply to encoders only"):
        Distill(samples=8).check(lm)
    with pytest.raises(UsageError, match="trains encoders on the CPU"):
        Distill(device="cuda").check(encoder)
    with pytest.raises(UsageError, match="samples and eval_samples must be >= 1"):
        Distill(eval_samples=0)
