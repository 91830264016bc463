"""Shared fixtures: the real example models (fetched once into the cache) and small artifacts built from them."""

from __future__ import annotations

import os
import sys
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from compressor.pipeline.build import run_recipe  # noqa: E402
from compressor.sources.examples import example_folder  # noqa: E402
from compressor.pipeline.recipe import recipe_from_dict  # noqa: E402

SMALL_TEXT = {"batch": 4, "seq_len": 64}
SMALL_IMAGE = {"batch": 2, "image_size": [112, 112]}


@pytest.fixture(scope="session")
def minilm_folder() -> Path:
    return example_folder("minilm")


@pytest.fixture(scope="session")
def dinov2_folder() -> Path:
    return example_folder("dinov2-small")


def build(tmp_root: Path, name: str, source: str, passes: list[dict], export: dict, samples: int | None, **validation) -> Path:
    if samples is not None:
        validation["samples"] = samples
    recipe = recipe_from_dict({"model": {"source": source}, "passes": passes, "export": export, "validation": validation})
    out = tmp_root / name
    run_recipe(recipe, out)
    return out


@pytest.fixture(scope="session")
def minilm_artifact(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("art"), "minilm", "example:minilm",
                 [{"name": "token_merge", "r": 8}], SMALL_TEXT, samples=16,
                 min_cosine_mean=0.9, min_cosine_p5=0.8)  # validation texts fill the 64 tokens: 75% of them merge


@pytest.fixture(scope="session")
def dinov2_artifact(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("art"), "dinov2", "example:dinov2-small",
                 [{"name": "token_merge", "r": 4}], SMALL_IMAGE, samples=8, min_agreement=0.75)


def pytest_collection_modifyitems(items):
    """A test that needs a compiled artifact (a `*_artifact` fixture) pays an ONNX export: slow, wherever it lives."""
    for item in items:
        if any(name.endswith("_artifact") for name in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def compress(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real `compress` entry point in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "compressor.cli", *args], capture_output=True, text=True, timeout=timeout)
