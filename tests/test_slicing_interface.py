"""SliceGPT through the adapters' slicing interface: the pass names no family, and a full-width rotation (nothing
sliced) leaves a real DINOv2's embeddings unchanged in both modes, so every hook the family implements (embeddings,
readers, writers and layer scale, norms, output projection, shortcut matrices) rotates consistently."""

import pytest
import torch

from compressor.errors import UsageError
from compressor.program.handle import ModelHandle, load

from .conftest import SMALL_IMAGE


def test_slicegpt_check_reads_the_adapters_refusal():
    from compressor.models import ADAPTERS
    from compressor.passes import SliceGPT

    sliceable = set()
    for cls in ADAPTERS:
        handle = ModelHandle(cls.__new__(cls), source=None, shapes={})
        try:
            SliceGPT(sparsity=0.25).check(handle)
            sliceable.add(cls.family)
        except UsageError as e:
            assert str(e) == handle.adapter.slicing_refusal and str(e).startswith("slicegpt")
    assert sliceable == {"llama", "qwen2", "qwen3", "mistral", "phi3", "dinov2"}


def random_rotation(width: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(width, width, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return q


@pytest.mark.parametrize("mode", ["portable", "per_layer"])
def test_full_width_rotation_keeps_dinov2_embeddings(mode):
    from compressor.passes.slicegpt import fold_norms, rotate_and_slice, slice_boundaries

    handle = load("example:dinov2-small", **SMALL_IMAGE)
    ad = handle.adapter
    pixels = handle.example_inputs()[0]
    with torch.no_grad():
        dense = handle.program(dense=True)(pixels)
    fold_norms(ad)
    cls_token = ad.model.embeddings.cls_token.clone()
    if mode == "portable":
        rotate_and_slice(ad, random_rotation(384, 0), 384)
    else:
        seeds = iter(range(100))
        slice_boundaries(ad, [pixels], [384] * 25, lambda _moment, keep: random_rotation(384, next(seeds))[:, :keep].float(),
                         normalize=False)
        assert ad.layers[3].layer.mlp_shortcut.weight.shape == (384, 384)
    assert ad.layers[0].scale1.lambda1.shape == (384,) and ad.model.layernorm.proj.in_features == 384
    with torch.no_grad():
        rotated = handle.program(dense=True)(pixels)
    assert torch.allclose(rotated, dense, atol=1e-3)
    assert (ad.model.embeddings.cls_token - cls_token).abs().max() > 0.1  # the stream did turn
