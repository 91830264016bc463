"""The static-shape program: dense equals transformers, and merging keeps its invariants on real inputs."""

import pytest
import torch

from compressor.program.handle import load
from compressor.program.merging import bipartite_soft_matching, max_merge
from compressor.models import NORMAL, PAD, PROTECTED
from compressor.program.encoder import TokenPlan

from .conftest import SMALL_IMAGE, SMALL_TEXT


@pytest.fixture(scope="module")
def text_handle():
    return load("example:minilm", **SMALL_TEXT)


@pytest.fixture(scope="module")
def image_handle():
    return load("example:dinov2-small", **SMALL_IMAGE)


@pytest.mark.parametrize("which", ["text", "image"])
def test_dense_program_equals_transformers(which, text_handle, image_handle):
    handle = text_handle if which == "text" else image_handle
    inputs = handle.example_inputs()
    with torch.no_grad():
        ours = handle.program(dense=True)(*inputs)
        ref = handle.adapter.reference_forward(*inputs)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_probe_batch_has_padding(text_handle):
    ids, mask = text_handle.example_inputs()
    assert (mask == 0).any() and (mask == 1).any(), "real sentences padded to the compiled length"


def test_matching_respects_kinds_on_real_keys(text_handle):
    handle = text_handle
    ids, mask = handle.example_inputs()
    x, kinds = handle.adapter.embed(ids, mask)
    bias = torch.where(kinds == PAD, -1e9, 0.0)
    with torch.no_grad():
        metric = handle.adapter.layers[0].attention(x, bias).metric
    r = 20
    m = bipartite_soft_matching(metric, kinds, r)
    a_kinds, b_kinds = kinds[:, ::2], kinds[:, 1::2]
    src_kinds = a_kinds.gather(1, m.src_idx[..., 0])
    dst_kinds = b_kinds.gather(1, m.dst_idx[..., 0])
    assert not (src_kinds == PROTECTED).any(), "CLS/SEP never merge away"
    assert ((src_kinds == PAD) == (dst_kinds == PAD)).all(), "padding only merges with padding"
    size = m.merge(torch.ones(kinds.shape + (1,)))
    new_kinds = m.select(kinds)
    assert size.shape[1] == kinds.shape[1] - r
    # every real token is accounted for exactly once
    real_before = (kinds != PAD).sum(1).float()
    real_after = (size[..., 0] * (new_kinds != PAD)).sum(1)
    assert torch.equal(real_before, real_after)
    assert (new_kinds[:, 0] == PROTECTED).all(), "CLS stays first"


def test_merging_without_padding_uses_similarity(image_handle):
    (pixels,) = image_handle.example_inputs()
    x, kinds = image_handle.adapter.embed(pixels)
    assert (kinds[:, 0] == PROTECTED).all() and (kinds[:, 1:] == NORMAL).all()
    m = bipartite_soft_matching(x, kinds, 8)
    merged = m.merge(x)
    assert merged.shape == (x.shape[0], x.shape[1] - 8, x.shape[2])


def test_size_weighted_output_is_finite_and_close(image_handle):
    inputs = image_handle.example_inputs()
    image_handle.plan = TokenPlan([4] * image_handle.num_layers)
    try:
        with torch.no_grad():
            merged = image_handle.program()(*inputs)
            dense = image_handle.program(dense=True)(*inputs)
    finally:
        image_handle.plan = TokenPlan()
    cos = torch.nn.functional.cosine_similarity(merged, dense)
    assert torch.isfinite(merged).all() and cos.min() > 0.9


def test_max_merge_caps():
    assert max_merge(128, 2) == 63
    assert max_merge(3, 2) == 0
    assert max_merge(1, 2) == 0
