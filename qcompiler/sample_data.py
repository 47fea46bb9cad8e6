"""Deterministic 224x224 image crops for calibrating and evaluating the demo model offline.

The crops come from the colour photographs that ship inside the scikit-image, scikit-learn
and matplotlib wheels (no download): astronaut, coffee, chelsea (a tabby cat), rocket, the right
view of the stereo motorcycle pair, the Hubble deep field, an immunohistochemistry slide, a
retina, scikit-learn's china (a palace) and flower, and matplotlib's portrait of Grace Hopper.
Grey-scale and synthetic images (skimage's color, logo, chessboard, textures; matplotlib's
logos and sprite) are left out, as are the skimage images fetched on demand (they fail without
network).

Each crop is a "random resized crop" inside its split's region: aspect ratio 3:4 to 4:3, an
area of 25-100 % of the largest box of that aspect ratio that fits the region, a random
position, resized to 224x224 with an antialiased bilinear filter, flipped horizontally with
probability one half, rounded to 8-bit pixel values (what a camera or an image
decoder hands the model), and normalised the way ``qcompiler.zoo`` models expect
(``(pixel - 127) / 128``, so values lie in [-127/128, 1] on a grid of step 1/128).

Three splits, disjoint by construction: every photo is cut into thirds along its long side,
and each split owns one third of every photo (calibration, validation and held-out crops never
share a pixel). Which third goes to which split rotates from photo to photo, so no split gets
all the centres of the pictures, where the subject usually is. Eleven photos are too few to
split by photo without giving the splits different subject matter (all cats on one side, say);
splitting by region keeps every split drawn from the same scenes. Crops of one photo are
correlated (same scene, similar predictions), so a figure measured on 500 held-out crops rests
on eleven independent photos, not 500: ``qcompiler.stats`` turns that into an honest
confidence interval, and ``crop_boxes`` says which photo each crop came from. The two views of
the stereo motorcycle pair would share content across splits (the disparity shifts it
sideways), so only one view is used.

- ``calib``: for calibration (observers, AdaRound, sensitivities).
- ``validation``: for choosing settings and defaults (``benchmarks/defaults.py``).
- ``heldout``: for the figures we report, touched by nothing that was tuned.
"""
from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from .errors import QCompileError
from .threads import torch_threads
from .zoo import INPUT_SIZE, PREPROCESS_MEAN, PREPROCESS_STD, DemoDependencyError

__all__ = [
    "CropBatches", "CropBox", "PHOTOS", "Region", "SPLITS", "SampleDataError", "calib_loader",
    "crop_boxes", "load_photos", "photo_crop", "region", "sample_crops",
]

Split = Literal["calib", "validation", "heldout"]
SPLITS: tuple[str, ...] = ("calib", "validation", "heldout")
PHOTOS: tuple[str, ...] = (
    "astronaut", "coffee", "chelsea", "rocket", "motorcycle", "hubble_deep_field",
    "immunohistochemistry", "retina", "china", "flower", "grace_hopper",
)
# Photos are brought to at most this many pixels on the long side when loaded: crops are
# downscaled to 224 anyway, and resizing a 1411-pixel retina for every crop would be slow.
_MAX_SIDE = 640
_AREA_RANGE = (0.25, 1.0)
_LOG_ASPECT_RANGE = (math.log(3 / 4), math.log(4 / 3))


class SampleDataError(QCompileError, ValueError):
    """A request for sample crops is malformed (bad count, batch size or split name)."""


@dataclass(frozen=True)
class Region:
    """The part of a loaded photo that one split owns: a box given by its top-left and size."""

    top: int
    left: int
    height: int
    width: int


@dataclass(frozen=True)
class CropBox:
    """Where one crop comes from: a box in the loaded photo (row/column of its top-left)."""

    photo: str
    top: int
    left: int
    height: int
    width: int
    flip: bool

    @property
    def bottom(self) -> int:
        return self.top + self.height

    @property
    def right(self) -> int:
        return self.left + self.width


def _read_photo(name: str) -> np.ndarray:
    try:
        if name in ("china", "flower"):
            return _read_sklearn_sample_image(f"{name}.jpg")
        if name == "grace_hopper":
            return _read_packaged_jpeg("matplotlib", ("mpl-data", "sample_data", "grace_hopper.jpg"))
        from skimage import data

        if name == "motorcycle":
            return data.stereo_motorcycle()[1]
        return getattr(data, name)()
    except ImportError as exc:
        raise DemoDependencyError(
            f"The sample photo '{name}' comes from scikit-image / scikit-learn / matplotlib, "
            'which are not all installed: run `pip install "qcompiler[demo]"`.') from exc


def _read_sklearn_sample_image(filename: str) -> np.ndarray:
    # Importing sklearn.datasets costs ~1.5 s; locating the package and reading the JPEG with
    # Pillow gives the same array (load_sample_image decodes it with Pillow too).
    return _read_packaged_jpeg("sklearn", ("datasets", "images", filename))


def _read_packaged_jpeg(package: str, parts: tuple[str, ...]) -> np.ndarray:
    """An RGB image file shipped inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{package} is not installed")
    from PIL import Image

    path = Path(spec.submodule_search_locations[0]).joinpath(*parts)
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@functools.lru_cache(maxsize=1)
def load_photos() -> dict[str, torch.Tensor]:
    """The sample photos as uint8 [3, H, W] tensors, long side at most 640 pixels.

    Cached and shared between callers: read them, do not modify them.
    """
    photos: dict[str, torch.Tensor] = {}
    for name in PHOTOS:
        image = torch.from_numpy(np.array(_read_photo(name), dtype=np.uint8)).permute(2, 0, 1)
        height, width = image.shape[1:]
        scale = _MAX_SIDE / max(height, width)
        if scale < 1:
            size = (round(height * scale), round(width * scale))
            image = F.interpolate(image[None].float(), size=size, mode="bilinear",
                                  antialias=True, align_corners=False)[0]
            image = image.round().clamp(0, 255).to(torch.uint8)
        photos[name] = image.contiguous()
    return photos


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SampleDataError(f"{name} must be a positive integer, got {value!r}.")


def _check_split(split: str) -> int:
    if split not in SPLITS:
        raise SampleDataError(f"split must be one of {SPLITS}, got {split!r}.")
    return SPLITS.index(split)


def region(name: str, split: Split) -> Region:
    """The third of photo `name` (as loaded) that `split` owns.

    The long side is cut at its thirds; photo number i of ``PHOTOS`` gives split number s of
    ``SPLITS`` third number (s + i) mod 3, so calibration, validation and held-out each get
    left, middle and right thirds of different photos.
    """
    split_index = _check_split(split)
    photos = load_photos()
    if name not in photos:
        raise SampleDataError(f"Unknown sample photo {name!r}; choose one of {PHOTOS}.")
    height, width = photos[name].shape[1:]
    along_width = width >= height
    length = width if along_width else height
    cuts = [0, round(length / 3), round(2 * length / 3), length]
    third = (split_index + PHOTOS.index(name)) % 3
    start, size = cuts[third], cuts[third + 1] - cuts[third]
    return Region(0, start, height, size) if along_width else Region(start, 0, size, width)


def crop_boxes(n: int, *, seed: int, split: Split = "calib") -> tuple[CropBox, ...]:
    """The `n` crop boxes `sample_crops` would cut, without cutting them.

    Photos are used in turn (in an order shuffled by `seed`) so each gets n/11 crops, give or
    take one. Every box lies inside its photo's `region` for `split`.
    """
    _check_count("n", n)
    split_index = _check_split(split)
    # The split is part of the seed so the splits draw independent streams.
    rng = np.random.default_rng([seed, split_index])
    order = rng.permutation(len(PHOTOS))
    regions = {name: region(name, split) for name in PHOTOS}
    boxes: list[CropBox] = []
    for i in range(n):
        name = PHOTOS[order[i % len(PHOTOS)]]
        r = regions[name]
        aspect = math.exp(rng.uniform(*_LOG_ASPECT_RANGE))           # width / height
        # The largest box of this aspect ratio inside the region, then 25-100 % of its area:
        # regions are narrow (a third of the photo), and clipping a box drawn from the whole
        # region's area would squash the crop out of the 3:4-4:3 range.
        full_w = min(r.width, r.height * aspect)
        full_h = full_w / aspect
        shrink = math.sqrt(rng.uniform(*_AREA_RANGE))
        crop_w = min(r.width, max(1, round(full_w * shrink)))
        crop_h = min(r.height, max(1, round(full_h * shrink)))
        top = r.top + int(rng.integers(0, r.height - crop_h + 1))
        left = r.left + int(rng.integers(0, r.width - crop_w + 1))
        boxes.append(CropBox(name, top, left, crop_h, crop_w, bool(rng.random() < 0.5)))
    return tuple(boxes)


def sample_crops(n: int, *, seed: int, split: Split = "calib",
                 size: int = INPUT_SIZE) -> torch.Tensor:
    """`n` normalised crops as a float32 tensor [n, 3, size, size]; same seed, same crops."""
    _check_count("size", size)
    photos = load_photos()
    out = torch.empty(n, 3, size, size)
    boxes = crop_boxes(n, seed=seed, split=split)
    # Many tiny resizes: split across threads they gain little on an idle machine and, on a loaded
    # two-core machine, made 768 crops 4-5x slower (threads spin waiting for each other).
    with torch_threads(1):
        for i, box in enumerate(boxes):
            crop = _resize(photos[box.photo][:, box.top:box.bottom, box.left:box.right], size)
            out[i] = crop.flip(-1) if box.flip else crop
    # One pass over the whole batch: per-crop arithmetic is dominated by call overhead.
    return _normalise_(out)


def photo_crop(name: str, size: int = INPUT_SIZE) -> torch.Tensor:
    """The largest centred square of photo `name`, resized and normalised: [3, size, size].

    It overlaps every split, so use it for sanity checks of the model (what does it see in the
    cat photo?), never for measuring a quantized model.
    """
    _check_count("size", size)
    photos = load_photos()
    if name not in photos:
        raise SampleDataError(f"Unknown sample photo {name!r}; choose one of {PHOTOS}.")
    image = photos[name]
    height, width = image.shape[1:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return _normalise_(_resize(image[:, top:top + side, left:left + side], size))


def _resize(patch: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [3, h, w] -> [3, size, size] 8-bit pixel values (integers 0-255, held as float)."""
    resized = F.interpolate(patch[None].float(), size=(size, size), mode="bilinear",
                            antialias=True, align_corners=False)[0]
    return resized.round_().clamp_(0, 255)


def _normalise_(pixels: torch.Tensor) -> torch.Tensor:
    """0-255 RGB -> the model's input scale, in place: (pixel - 255 * mean) / (255 * std).

    The offsets are formed in float64 and rounded once to float32, where the zoo's 127 and 128
    come out exact, so every normalised value is exactly (pixel - 127) / 128.
    """
    offset = (torch.tensor(PREPROCESS_MEAN, dtype=torch.float64) * 255).float().view(3, 1, 1)
    divisor = (torch.tensor(PREPROCESS_STD, dtype=torch.float64) * 255).float().view(3, 1, 1)
    return pixels.sub_(offset).div_(divisor)


class CropBatches:
    """Re-iterable batches of sample crops (each a [B, 3, 224, 224] tensor), cut once."""

    def __init__(self, crops: torch.Tensor, batch_size: int) -> None:
        self.crops = crops
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.crops) // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.crops.split(self.batch_size))


def calib_loader(n: int = 256, batch_size: int = 32, seed: int = 0,
                 split: Split = "calib") -> CropBatches:
    """`n` crops of `split` (calibration by default) in batches of `batch_size` (the last may be
    smaller)."""
    _check_count("batch_size", batch_size)
    return CropBatches(sample_crops(n, seed=seed, split=split), batch_size)
