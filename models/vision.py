"""What the ViT-like vision encoders share: patch grid plus leading special tokens (CLS, DeiT's distillation token),
position embeddings interpolated once per compiled image size, and pre-processing read from the folder."""

from __future__ import annotations

import json
from abc import abstractmethod
from pathlib import Path

import torch

from .base import NORMAL, PROTECTED, InputSpec
from .capabilities import DepthPrunable, EncoderAdapter, HeadPrunable, WidthPrunable

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def read_preprocess(folder: Path, defaults: dict) -> dict:
    """The family's defaults, overridden by the folder's preprocessor_config.json (transformers' image processor
    keys, or this project's own size/mean/std/resample)."""
    out = dict(defaults)
    path = folder / "preprocessor_config.json"
    if not path.exists():
        return out
    cfg = json.loads(path.read_text())
    for ours, theirs in (("mean", "image_mean"), ("std", "image_std")):
        value = cfg.get(ours, cfg.get(theirs))
        if isinstance(value, (int, float)):
            value = [float(value)] * 3
        if value is not None:
            out[ours] = list(value)
    resample = cfg.get("resample")
    if isinstance(resample, int):
        resample = PIL_RESAMPLE.get(resample, "bicubic")
    if resample in ("nearest", "bilinear", "bicubic"):
        out["resample"] = resample
    if "do_center_crop" in cfg:
        out["crop"] = bool(cfg["do_center_crop"]) and "shortest_edge" in (cfg.get("size") or {})
    return out


class VisionEncoderAdapter(EncoderAdapter, HeadPrunable, WidthPrunable, DepthPrunable):
    """Pixels in, one vector per image out. Subclasses give `special_tokens()`, `patches(pixels)` and the cached
    position table `_positions(h, w)`."""

    modality = "image"
    norm_placement = "pre"
    protected_per_sample = 1  # CLS
    pooling = "cls"  # pool() reads the class token
    default_preprocess = {"size": [224, 224], **IMAGENET, "resample": "bicubic"}

    def __init__(self, model, folder):
        super().__init__(model, folder)
        self._wrap_layers()
        self.preprocess = read_preprocess(Path(folder), self.default_preprocess)
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    def input_specs(self, shapes):
        h, w = shapes["image_size"]
        return [InputSpec("pixel_values", (shapes["batch"], 3, h, w), "float32")]

    def num_tokens(self, shapes):
        h, w = shapes["image_size"]
        return (h // self.patch_size) * (w // self.patch_size) + self.protected_per_sample

    def prepare(self, shapes):
        self.position_embeddings(*shapes["image_size"])

    def position_embeddings(self, h: int, w: int) -> torch.Tensor:
        """Interpolated once per image size at compile time, so the graph carries a constant instead of a resize."""
        if (h, w) not in self._pos_cache:
            with torch.no_grad():
                self._pos_cache[(h, w)] = self._positions(h, w).detach().clone()
        return self._pos_cache[(h, w)]

    @abstractmethod
    def _positions(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings (1, N, C) for an h x w image, special tokens first: cached per size by `position_embeddings`."""

    @abstractmethod
    def special_tokens(self) -> list[torch.Tensor]:
        """The learned tokens in front of the patches (CLS; DeiT's distillation token): they never merge."""

    @abstractmethod
    def patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch embeddings (B, N_patches, C) of the pixels."""

    def embed(self, pixel_values):
        b, _, h, w = pixel_values.shape
        tokens = [t.reshape(1, 1, -1).expand(b, -1, -1) for t in self.special_tokens()]
        x = torch.cat([*tokens, self.patches(pixel_values)], dim=1) + self.position_embeddings(h, w)
        position = torch.arange(x.shape[1])
        kinds = torch.where(position < len(tokens), PROTECTED, NORMAL).expand(b, -1)
        return x, kinds

    def final_norm(self, x):
        return x  # the final norm is per token: pool() applies it to the CLS token alone

    def preprocess_config(self, shapes):
        return {"kind": "image", **self.preprocess, "size": list(shapes["image_size"])}
