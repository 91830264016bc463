"""Natural photographs for vision encoders, from packages; calibration and validation come from different ones.

Calibration: crops of 13 photographs in Debian's `lomiri-wallpapers-16.04` (`apt-get install lomiri-wallpapers-16.04`,
16 MB; 1.5-16 megapixels: mountains, a stream, a sunset, dandelions, a tree, dogs, a fig, paint brushes, a room, a
bridge, a clock, a lamp; CC-BY-4.0, CC-BY-SA-4.0 and CC0-1.0, see /usr/share/doc/lomiri-wallpapers-16.04/copyright).
Each calibration input is its own seeded random crop (as RandomResizedCrop draws them: 10-100% of a photo's area,
aspect 3:4 to 4:3, mirrored half the time), so a few hundred inputs are a few hundred different views. The package's
two graphics (a colour gradient, a tinted texture) are left out.

Validation (held out): the everyday photographs bundled in the scikit-image wheel (an astronaut, a cat, a coffee cup, a
rocket launch, a cameraman in grey; public domain or CC0), the scikit-learn wheel (a temple, a flower; CC-BY-2.0) and
matplotlib's sample data (Grace Hopper; US Navy, public domain): wheels fetched once with `pip download` into the
cache, never installed. View 0 of each photo is the whole photo; further views are seeded crops of 30-80% of it.
Validation photos come round-robin, so 8 samples are 8 different photos. No file is in both sets.
"""

from __future__ import annotations

import importlib.util
import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from compressor.errors import UsageError

CALIBRATION_PACKAGE = "lomiri-wallpapers-16.04"
CALIBRATION_DIR = Path("/usr/share/backgrounds")
CALIBRATION_PHOTOS = (
    "aitzgorri_by_Aitzol_Berasategi.jpg", "Bridge_by_Sander_Klootwijk.jpg", "Dragonfly_by_Bolly.jpg",
    "free_by_Peter_Nerlich.jpg", "friends_by_Aitzol_Berasategi.jpg", "greentock_by_Peter_Nerlich.jpg",
    "life_by_Aitzol_Berasategi.jpg", "picosdeeuropa_by_Aitzol_Berasategi.jpg", "Picture_0B_by_freespace.jpg",
    "Picture_1A_by_freespace.jpg", "seeding_by_Clements_Engelhardt.jpg", "sunset_by_Aitzol_Berasategi.jpg",
    "Wine_by_Jakkub_Mede.jpg",
)
WORK_SIDE = 768  # calibration photos are decoded once at this shorter side (a crop of 10% of the area still has 243 px)
CROP_AREA = (0.10, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)

SKIMAGE = "scikit-image==0.26.0"
SKLEARN = "scikit-learn==1.9.1"
SKIMAGE_PHOTOS = {"skimage/data/astronaut.png": "astronaut.png", "skimage/data/chelsea.png": "chelsea.png",
                  "skimage/data/coffee.png": "coffee.png", "skimage/data/rocket.jpg": "rocket.jpg",
                  "skimage/data/camera.png": "camera.png"}
SKLEARN_PHOTOS = {"sklearn/datasets/images/china.jpg": "china.jpg", "sklearn/datasets/images/flower.jpg": "flower.jpg"}
MATPLOTLIB_PHOTO = "mpl-data/sample_data/grace_hopper.jpg"
VALIDATION_SEED = 20240
VIEW_AREA = (0.30, 0.80)

CALIBRATION_DESCRIPTION = f"random crops of {len(CALIBRATION_PHOTOS)} photographs from Debian's {CALIBRATION_PACKAGE}"
VALIDATION_DESCRIPTION = "held-out photographs from the scikit-image, scikit-learn and matplotlib packages (whole and cropped)"


def calibration_photo_files() -> list[Path]:
    files = [CALIBRATION_DIR / name for name in CALIBRATION_PHOTOS]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UsageError(f"the calibration photographs are not installed ({CALIBRATION_DIR / missing[0]} is missing): "
                         f"apt-get install {CALIBRATION_PACKAGE}, or give your own: [data] calibration = \"FOLDER\"")
    return files


def _matplotlib_photo() -> Path:
    spec = importlib.util.find_spec("matplotlib")
    path = Path(spec.origin).parent / MATPLOTLIB_PHOTO if spec and spec.origin else None
    if path is None or not path.is_file():
        raise UsageError("the validation photographs need matplotlib's sample data (pip install matplotlib), "
                         "or give your own: [data] images = \"FOLDER\"")
    return path


def validation_photo_files() -> list[Path]:
    """The held-out photos, in the round-robin order validation reads them (people, animals, objects, places)."""
    from compressor.sources.cache import cache_dir, extract_files, fetch_wheel

    root = cache_dir() / "data"
    skimage = extract_files(fetch_wheel(SKIMAGE), SKIMAGE_PHOTOS, root / "photos-scikit-image")
    sklearn = extract_files(fetch_wheel(SKLEARN), SKLEARN_PHOTOS, root / "photos-scikit-learn")
    return [skimage / "astronaut.png", skimage / "chelsea.png", sklearn / "china.jpg", skimage / "coffee.png",
            _matplotlib_photo(), skimage / "rocket.jpg", sklearn / "flower.jpg", skimage / "camera.png"]


@lru_cache(maxsize=len(CALIBRATION_PHOTOS))
def _working_copy(path: str):
    """A calibration photo decoded at WORK_SIDE on its shorter side (JPEG draft mode: decoded at reduced scale)."""
    from PIL import Image

    with Image.open(path) as im:
        scale = WORK_SIDE / min(im.size)
        im.draft("RGB", (math.ceil(im.width * scale), math.ceil(im.height * scale)))
        im = im.convert("RGB")
        scale = WORK_SIDE / min(im.size)
        return im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)


def _crop_box(rng: np.random.Generator, width: int, height: int, area: tuple[float, float]) -> tuple[int, int, int, int]:
    """A box of a random fraction of the image's area and a random aspect in CROP_ASPECT, at a random place."""
    a = rng.uniform(*area) * width * height
    r = math.exp(rng.uniform(math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])))
    w = min(width, max(1, round(math.sqrt(a * r))))
    h = min(height, max(1, round(math.sqrt(a / r))))
    left = int(rng.integers(0, width - w + 1))
    top = int(rng.integers(0, height - h + 1))
    return left, top, left + w, top + h


def _resized(image, size):
    from PIL import Image

    if size is None:
        return image
    height, width = int(size[0]), int(size[1])
    return image.resize((width, height), Image.BICUBIC, reducing_gap=3.0)


def calibration_crops(count: int, seed: int = 42, size=None) -> list:
    """`count` crops (PIL RGB images; resized to `size` = [height, width] when given). Input i is photo i mod 13
    (every photo equally often), its crop drawn from (seed, i): the first n of a larger draw are the same n."""
    from PIL import ImageOps

    files = calibration_photo_files()
    out = []
    for i in range(count):
        photo = _working_copy(str(files[i % len(files)]))
        rng = np.random.default_rng([seed, i])
        crop = photo.crop(_crop_box(rng, photo.width, photo.height, CROP_AREA))
        if rng.random() < 0.5:
            crop = ImageOps.mirror(crop)
        out.append(_resized(crop, size))
    return out


def validation_views(count: int, size=None) -> list:
    """`count` held-out views (PIL RGB images at their own size unless `size` is given): photo k mod 8, view k // 8;
    view 0 is the whole photo, view j >= 1 a crop of 30-80% of its area drawn from (VALIDATION_SEED, photo, j),
    mirrored when j is odd."""
    from PIL import Image, ImageOps

    files = validation_photo_files()
    photos = [Image.open(f).convert("RGB") for f in files[:count]]
    out = []
    for k in range(count):
        p, j = k % len(files), k // len(files)
        photo = photos[p]
        if j:
            rng = np.random.default_rng([VALIDATION_SEED, p, j])
            photo = photo.crop(_crop_box(rng, photo.width, photo.height, VIEW_AREA))
            if j % 2:
                photo = ImageOps.mirror(photo)
        out.append(_resized(photo, size))
    return out
