"""Real data for probing, calibration, validation and benchmarks, from packages (never a hub), and the user's own.

Text: the Lee corpus in the gensim wheel's test data (`lee_background.cor` for probe/validation sentences; `lee.cor`
with human similarity judgements for the benchmark). Images: natural photographs (`photos.py`: calibration crops from
one package, held-out validation photos from others); Fashion-MNIST from Debian's `dataset-fashion-mnist` only where a
benchmark needs labels (linear probes).

A recipe's `[data] calibration = PATH` (a text file, or a folder of images) replaces the built-in calibration data of
every pass that calibrates: `calibration_data` checks it once (exists, right kind, not empty, held apart from the
validation data) and `attach_calibration` hands it to the model handle, where `compressor.sources.inputs.
calibration_inputs` (the one function every calibrating pass draws through) finds it.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compressor.sources.cache import cache_dir, extract_members, fetch_wheel
from compressor.errors import UsageError
from compressor.runtime.artifact import sha256_of

GENSIM = "gensim==4.4.0"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
PROBE_SEED = 7  # probe crops: drawn apart from the calibration passes' default seed (42)


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


def split_text_samples(text: str) -> tuple[list[str], str]:
    """A text file's samples and what they are: with blank lines between blocks, each block is one paragraph (its
    lines joined by spaces); without, each non-empty line is one sample."""
    lines = [line.strip() for line in text.splitlines()]
    blocks, current = [], []
    for line in lines + [""]:
        if line:
            current.append(line)
        elif current:
            blocks.append(" ".join(current))
            current = []
    if len(blocks) > 1:  # a blank line stands between two blocks
        return blocks, "paragraphs"
    return [line for line in lines if line], "lines"


def read_text_samples(path: str | Path, what: str = "text file") -> tuple[list[str], str]:
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{what} '{path}' is a folder; give a text file (one sample per line, or paragraphs "
                         f"between blank lines)")
    if not p.is_file():
        raise UsageError(f"{what} '{path}' does not exist")
    samples, unit = split_text_samples(p.read_text(encoding="utf-8", errors="replace"))
    if not samples:
        raise UsageError(f"{what} '{path}' holds no non-empty lines")
    return samples, unit


def read_text_file(path: str | Path) -> list[str]:
    """The texts of a user's file: one per line, or one per paragraph when blank lines separate them."""
    return read_text_samples(path)[0]


def image_files(path: str | Path, what: str = "image folder") -> list[Path]:
    p = Path(path)
    if p.is_file():
        raise UsageError(f"{what} '{path}' is a file; give a folder of .png/.jpg images")
    if not p.is_dir():
        raise UsageError(f"{what} '{path}' does not exist")
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"{what} '{path}' holds no .png/.jpg images")
    return files


def open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"image '{path}' cannot be read ({e})") from None


def read_image_folder(path: str | Path, count: int) -> list:
    """The first `count` images of a folder in name order (all of them when it holds fewer)."""
    return [open_image(f) for f in image_files(path)[:count]]


def image_split(part: str, count: int, size=None) -> list:
    """Natural photographs: 'probe' inputs are calibration-set crops (resized to `size` = [height, width] when
    given), 'validation' inputs the held-out photos (whole and cropped, at their own size); see photos.py."""
    from compressor.sources import photos

    if part == "validation":
        return photos.validation_views(count)
    return photos.calibration_crops(count, seed=PROBE_SEED, size=size)


@dataclass(frozen=True)
class CalibrationData:
    """A user's calibration data: a text file (lines or paragraphs) or a folder of images, fingerprinted."""

    path: str  # absolute
    kind: str  # "text" or "images"
    unit: str  # "lines", "paragraphs" or "images"
    count: int
    sha256: str  # of the text file; of a folder: of its image files' names and contents, in name order

    def describe(self) -> str:
        return f"{self.count} {self.unit} from {self.path} (sha256 {self.sha256[:12]})"

    def to_json(self) -> dict:
        return {"path": self.path, "kind": self.kind, "unit": self.unit, "count": self.count, "sha256": self.sha256}

    def _chosen(self, samples: int, seed: int, option: str) -> list[int]:
        if samples > self.count:
            raise UsageError(f"[data] calibration '{self.path}' holds {self.count} {self.unit}; {option} asks for "
                             f"{samples}: add data or lower {option}")
        return sorted(np.random.default_rng(seed).permutation(self.count)[:samples].tolist())

    def texts(self, samples: int, seed: int = 42, option: str = "calibration_samples") -> list[str]:
        """`samples` distinct texts, drawn with `seed` (file order kept)."""
        every, _ = read_text_samples(self.path, "[data] calibration")
        return [every[i] for i in self._chosen(samples, seed, option)]

    def text(self) -> str:
        """The whole text, samples separated by blank lines (language models cut token windows from it)."""
        return "\n\n".join(read_text_samples(self.path, "[data] calibration")[0])

    def images(self, samples: int, seed: int = 42, option: str = "calibration_samples") -> list:
        """`samples` distinct images (PIL RGB), drawn with `seed` (name order kept)."""
        files = image_files(self.path, "[data] calibration")
        return [open_image(files[i]) for i in self._chosen(samples, seed, option)]


def calibration_data(data: dict | None, target) -> CalibrationData | None:
    """The recipe's `[data] calibration`, checked for this kind of model (None: the built-in calibration data)."""
    path = (data or {}).get("calibration")
    if path is None:
        return None
    if not isinstance(path, str) or not path:
        raise UsageError(f"[data] calibration must be a path (a text file or a folder of images), got {path!r}")
    if not target.calibrates:
        raise UsageError("[data] calibration: no pass of a speech model calibrates on data (Whisper takes token_merge, "
                         "whose rate is fixed); remove it")
    p = Path(path).expanduser().absolute()
    if not p.exists():
        raise UsageError(f"[data] calibration '{path}' does not exist")
    if target.image:
        files = image_files(p, "[data] calibration")
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.name}\0{sha256_of(f)}\n".encode())
        return CalibrationData(str(p), "images", "images", len(files), h.hexdigest())
    samples, unit = read_text_samples(p, "[data] calibration")
    return CalibrationData(str(p), "text", unit, len(samples), sha256_of(p))


def calibration_requests(passes, target) -> list[tuple[str, str, int]]:
    """(pass, option, inputs asked) for each pass of a recipe that reads calibration data; language models ask in
    windows of tokens, checked when the pass runs (its tokenizer counts them)."""
    return [(p.name, *need) for p in passes if (need := p.calibration_need(target))]


def check_calibration(data: dict, target, passes) -> CalibrationData | None:
    """Everything about `[data] calibration` that can be checked before a model loads, in one line each: the path,
    that a pass reads it, that it holds what the passes ask (encoders), that validation data is held apart."""
    cal = calibration_data(data, target)
    if cal is None:
        if data.get("calibration_sha256") is not None:
            raise UsageError("[data] calibration_sha256 is given without calibration = PATH")
        return None
    recorded = data.get("calibration_sha256")
    if recorded is not None and recorded != cal.sha256:
        raise UsageError(f"[data] calibration '{cal.path}' changed since this recipe was resolved (sha256 "
                         f"{cal.sha256[:12]}, recorded {str(recorded)[:12]}); drop calibration_sha256 to accept it")
    requests = calibration_requests(passes, target)
    if passes and not requests:
        names = ", ".join(sorted({p.name for p in passes}))
        raise UsageError(f"[data] calibration: no pass of this recipe calibrates on data ({names}); remove it, or add "
                         f"width_prune, layer_prune, slicegpt, learned_rates or distill")
    if not target.decoder:
        for name, option, asked in requests:
            if asked > cal.count:
                raise UsageError(f"[data] calibration '{cal.path}' holds {cal.count} {cal.unit}; {name} {option} asks "
                                 f"for {asked}: add data or lower {option}")
    check_held_apart(cal, data.get(target.held_out_key))
    return cal


def check_held_apart(cal: CalibrationData, validation: str | None) -> None:
    """Validation must not read what calibration read: the same file or folder, or any identical image, is refused."""
    if not validation:
        return
    v = Path(validation).expanduser().absolute()
    same = f"[data] calibration and [data] {'images' if cal.kind == 'images' else 'texts'}"
    if v == Path(cal.path) or (v.exists() and Path(cal.path).exists() and v.resolve() == Path(cal.path).resolve()):
        raise UsageError(f"{same} name the same data ('{validation}'): validation must be held out from calibration; "
                         f"split it (e.g. 80/20), or drop one of them to use the built-in set")
    if cal.kind != "images" and v.is_file() and sha256_of(v) == cal.sha256:
        raise UsageError(f"{same} are the same text ('{validation}' and '{cal.path}'): validation must be held out "
                         f"from calibration; split it")
    if cal.kind == "images" and v.is_dir():
        shared = {sha256_of(f) for f in image_files(cal.path)} & {sha256_of(f) for f in image_files(v)}
        if shared:
            raise UsageError(f"{same} share {len(shared)} image(s) ('{cal.path}', '{validation}'): validation must "
                             f"be held out from calibration; remove them from one folder")


def attach_calibration(handle, data: dict | None) -> None:
    """Give a loaded model the recipe's calibration data (None: the built-in sets); every calibrating pass then
    draws from it through compressor.sources.inputs.calibration_inputs. `run_recipe` calls this after `load`."""
    cal = calibration_data(data, handle.target)
    recorded = (data or {}).get("calibration_sha256")
    if cal is not None and recorded is not None and recorded != cal.sha256:
        raise UsageError(f"[data] calibration '{cal.path}' changed while the recipe ran (sha256 {cal.sha256[:12]}, "
                         f"recorded {str(recorded)[:12]})")
    handle.calibration = cal


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels (N,)) for split 'train' or 'test': for benchmarks that need labels."""
    prefix = "train" if split == "train" else "t10k"
    images, labels = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz", FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists():
        raise UsageError(
            f"Fashion-MNIST not found at {FASHION_MNIST_DIR}: install it with 'apt-get install dataset-fashion-mnist'"
        )
    return _idx(images), _idx(labels)


