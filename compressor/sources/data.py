"""Real data for probing, validation and benchmarks, from packages (never a hub).

Text: the Lee corpus in the gensim wheel's test data (`lee_background.cor` for probe/validation sentences; `lee.cor`
with human similarity judgements for the benchmark). Images: Fashion-MNIST from Debian's `dataset-fashion-mnist`.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np

from compressor.sources.cache import cache_dir, extract_members, fetch_wheel
from compressor.errors import UsageError

GENSIM = "gensim==4.4.0"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def gensim_test_data() -> Path:
    return extract_members(fetch_wheel(GENSIM), "gensim/test/test_data/", cache_dir() / "data" / "gensim-test-data")


def _read_latin1_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="latin-1").splitlines() if line.strip()]


def lee_documents() -> list[str]:
    """The 50 Lee corpus documents that the human judgements rate."""
    return _read_latin1_lines(gensim_test_data() / "lee.cor")


def lee_human_similarities() -> np.ndarray:
    """50x50 human similarity matrix (upper triangle filled; rows of tab-separated floats)."""
    rows = _read_latin1_lines(gensim_test_data() / "similarities0-1.txt")
    return np.array([[float(v) for v in row.split()] for row in rows], dtype=np.float64)


def background_sentences() -> list[str]:
    """Sentences of the Lee background corpus (about 300 news documents), in file order."""
    docs = _read_latin1_lines(gensim_test_data() / "lee_background.cor")
    out = []
    for doc in docs:
        out.extend(s.strip() for s in re.split(r"(?<=[.!?])\s+", doc) if len(s.split()) >= 4)
    return out


def text_split(part: str, count: int) -> list[str]:
    """Deterministic disjoint parts: 'probe' from the front of the corpus, 'validation' from the back."""
    sentences = background_sentences()
    if count > len(sentences) // 2:
        raise UsageError(f"asked for {count} {part} sentences; the corpus holds {len(sentences) // 2} per part")
    return sentences[:count] if part == "probe" else sentences[-count:]


def read_text_file(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"text file '{path}' does not exist")
    lines = [line.strip() for line in p.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    if not lines:
        raise UsageError(f"text file '{path}' holds no non-empty lines")
    return lines


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels (N,)) for split 'train' or 'test'."""
    prefix = "train" if split == "train" else "t10k"
    images, labels = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz", FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists():
        raise UsageError(
            f"Fashion-MNIST not found at {FASHION_MNIST_DIR}: install it with 'apt-get install dataset-fashion-mnist' "
            "or set [data] images = FOLDER in the recipe"
        )
    return _idx(images), _idx(labels)


def image_split(part: str, count: int) -> list[np.ndarray]:
    """Probe images from the Fashion-MNIST training set, validation images from its test set."""
    images, _ = fashion_mnist("train" if part == "probe" else "test")
    return [images[i] for i in range(count)]


def read_image_folder(path: str | Path, count: int) -> list:
    from PIL import Image

    p = Path(path)
    files = sorted(f for f in p.glob("*") if f.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".webp"}) if p.is_dir() else []
    if not files:
        raise UsageError(f"image folder '{path}' holds no .png/.jpg images")
    return [Image.open(f).convert("RGB") for f in files[:count]]
