"""Model sources: a local Hugging Face folder, or `example:NAME` fetched once into the cache."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from compressor.models import ModelAdapter, adapter_for, supported_model_types

from compressor.errors import UsageError
from compressor.runtime.artifact import sha256_of
from compressor.sources.examples import EXAMPLES, example_folder
from compressor.sources.checkpoint import check_loading_info, check_weights_file, load_failure
from compressor.sources.gguf import conversion_record, converted_folder, gguf_file

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class SourceInfo:
    spec: str  # what the user wrote: a path or example:NAME
    folder: str
    model_type: str
    weights_file: str
    weights_sha256: str
    converted_from: dict | None = None  # a GGUF source: {"gguf_file", "gguf_sha256"}; the folder is its conversion

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @property
    def reload_spec(self) -> str:
        """What reloads the same model: the example name, or the resolved folder (a relative path may have moved)."""
        return self.spec if self.spec.startswith("example:") else self.folder


def resolve_folder(spec: str) -> Path:
    if spec.startswith("example:"):
        return example_folder(spec.split(":", 1)[1])
    path = Path(spec).expanduser()
    if not path.exists():
        known = " / ".join(f"example:{name}" for name in EXAMPLES)
        raise UsageError(f"model path '{spec}' does not exist (give a Hugging Face model folder, a .gguf file or {known})")
    if (gguf := gguf_file(path, spec)) is not None:
        return converted_folder(gguf, spec)
    if not path.is_dir() or not (path / "config.json").exists():
        raise UsageError(f"'{spec}' is not a Hugging Face model folder: no config.json inside")
    return path


def read_model_type(folder: Path, spec: str) -> str:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"'{spec}': config.json is not readable JSON ({e})") from None
    model_type = config.get("model_type")
    if adapter_for(model_type or "") is None:
        near = nearest_model_type(model_type or "")
        if near is None:
            raise UsageError(f"'{spec}': no adapter for model type '{model_type}' (supported: {', '.join(supported_model_types())}); "
                             "see `compress models`, or add one file under models/")
        family = adapter_for(near)
        raise UsageError(f"'{spec}': no adapter for model type '{model_type}'; the nearest supported family is "
                         f"{family.family} ({', '.join(family.model_types)}): see `compress models`")
    return model_type


def nearest_model_type(name: str) -> str | None:
    """The supported model type that `name` extends (`vit_mae` -> vit, `xlm-roberta-xl` -> xlm-roberta), else the
    most similar by spelling, if any is close."""
    import difflib
    import re

    types = supported_model_types()
    low = name.lower()
    extended = [t for t in types if re.match(re.escape(t) + r"($|[-_])", low)]
    if extended:
        return max(extended, key=len)
    words = re.split(r"[-_]", low)
    named = [t for t in types if t in words]
    if named:
        return named[0]
    close = difflib.get_close_matches(low, types, n=1, cutoff=0.6)
    return close[0] if close else None


def load_source(spec: str) -> tuple[ModelAdapter, SourceInfo]:
    """Load the model behind `spec` in eval mode, wrapped in its family adapter.

    A checkpoint that does not fill the model its config describes is refused here, before any pass: weights missing
    (transformers would initialise them randomly), tensors the model has no place for, shapes other than the
    config's; also a weights file that is truncated or not a checkpoint. See `check_loading_info` for what is tolerated."""
    folder = resolve_folder(spec)
    model_type = read_model_type(folder, spec)
    weights = next((folder / w for w in WEIGHT_FILES if (folder / w).exists()), None)
    if weights is None:
        raise UsageError(f"'{spec}' has no weights ({' or '.join(WEIGHT_FILES)})")
    check_weights_file(weights, spec)
    import warnings

    import torch
    import transformers

    adapter_cls = adapter_for(model_type)
    with warnings.catch_warnings(record=True) as caught:  # shown below only if the model loads (a refusal is one line)
        try:
            auto = getattr(transformers, adapter_cls.auto_class)
            # ignore_mismatched_sizes: every mismatch comes back in the loading info (refused below), not only the first
            model, info = auto.from_pretrained(str(folder), attn_implementation="eager", dtype=torch.float32,
                                               output_loading_info=True, ignore_mismatched_sizes=True)
        except Exception as e:  # transformers raises many types for a broken folder
            raise UsageError(load_failure(e, weights, spec)) from None
    check_loading_info(model, info, adapter_cls, weights, spec)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = adapter_cls(model, folder)
    info = SourceInfo(spec, str(folder.resolve()), model_type, weights.name, sha256_of(weights), conversion_record(folder))
    return adapter, info
