"""Pre-processing stored in the artifact: tokenization for text encoders, resize/normalise for vision encoders.

numpy only; `tokenizers` and Pillow are imported when first used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import FeedError, FeedTypeError, RuntimeArtifactError, RuntimeUsageError


def as_list(values, call: str, what: str, item_ok) -> list:
    """A list or tuple whose items all pass `item_ok`, else one line naming the call and the type it got
    (a lone string is refused too: embedding its characters one by one is never what was meant)."""
    if not isinstance(values, (list, tuple)):
        raise FeedTypeError(f"{call} takes a list of {what}, got {type(values).__name__}")
    bad = [i for i, v in enumerate(values) if not item_ok(v)]
    if bad:
        raise FeedTypeError(f"{call} takes a list of {what}; item {bad[0]} is {type(values[bad[0]]).__name__}")
    return list(values)


def check_text(texts: list[str], call: str, single: bool = False) -> list[str]:
    """Texts the tokenizer can take: valid Unicode (a lone surrogate such as '\\ud800', left by decoding bytes with
    errors='surrogateescape' or by a broken JSON escape, cannot be encoded as UTF-8), else one FeedError line."""
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            where = "the text" if single else f"item {i}"
            raise FeedError(f"{call}: {where} is not valid Unicode (a lone surrogate {text[e.start]!r} at character "
                            f"{e.start}); decode its bytes with errors='replace'") from None
    return texts


def load_tokenizer(path: Path):
    """The `tokenizers` Tokenizer in a verified tokenizer.json; one that the library cannot read is one line."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except RuntimeUsageError:
        raise
    except Exception as e:  # tokenizers raises plain Exceptions
        reason = " ".join(str(e).split())[:200]
        raise RuntimeArtifactError(f"the tokenizer '{Path(path).name}' cannot be read ({reason}); rebuild the artifact") from None


class TextPreprocessor:
    def __init__(self, tokenizer_file: Path, seq_len: int, pad_id: int):
        self.tokenizer = load_tokenizer(tokenizer_file)
        self.tokenizer.enable_truncation(max_length=seq_len)
        self.tokenizer.enable_padding(length=seq_len, pad_id=pad_id)
        self.seq_len = seq_len
        self.last_truncated = 0  # texts cut to seq_len by the latest call

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        texts = check_text(as_list(texts, "embed()", "strings", lambda t: isinstance(t, str)), "embed()")
        enc = self.tokenizer.encode_batch(texts)
        self.last_truncated = sum(1 for e in enc if e.overflowing)
        ids = np.array([e.ids for e in enc], dtype=np.int64).reshape(len(texts), self.seq_len)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64).reshape(len(texts), self.seq_len)
        return {"input_ids": ids, "attention_mask": mask}


class ImagePreprocessor:
    """Resize to the compiled size (or, with `crop`, resize until it covers that size and cut out its centre, as
    CLIP's processor does), scale to [0, 1], normalise with the stored mean and std, NCHW float32."""

    def __init__(self, size, mean, std, resample: str = "bicubic", crop: bool = False):
        self.size = (int(size[0]), int(size[1]))  # (height, width)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        self.resample = resample
        self.crop = crop

    @classmethod
    def from_config(cls, pre: dict) -> "ImagePreprocessor":
        """From the artifact's stored `preprocess` entry."""
        return cls(pre["size"], pre["mean"], pre["std"], pre.get("resample", "bicubic"), bool(pre.get("crop", False)))

    @staticmethod
    def is_image(image) -> bool:
        from PIL import Image

        return isinstance(image, (np.ndarray, Image.Image))

    @classmethod
    def image_list(cls, images, call: str) -> list:
        return as_list(images, call, "PIL images or uint8 arrays", cls.is_image)

    def one(self, image) -> np.ndarray:
        from PIL import Image

        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3):
                raise FeedError("images given as arrays must be uint8 HxW or HxWxC")
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise FeedTypeError(f"expected a PIL image or a uint8 array, got {type(image).__name__}")
        resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[self.resample]
        image = image.convert("RGB")
        h, w = self.size
        if self.crop:
            scale = max(h / image.height, w / image.width)
            image = image.resize((max(w, round(image.width * scale)), max(h, round(image.height * scale))), resample)
            left, top = (image.width - w) // 2, (image.height - h) // 2
            image = image.crop((left, top, left + w, top + h))
        else:
            image = image.resize((w, h), resample)
        x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return (x - self.mean) / self.std

    def __call__(self, images) -> dict[str, np.ndarray]:
        images = self.image_list(images, "embed_images()")
        if not images:
            return {"pixel_values": np.zeros((0, 3) + self.size, np.float32)}
        return {"pixel_values": np.stack([self.one(im) for im in images]).astype(np.float32)}
