"""Sample crops: offline photos, determinism, normalisation, and disjoint calib/validation/held-out boxes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.transform import resize

from qcompiler.errors import QCompileError
from qcompiler.sample_data import (
    PHOTOS, SPLITS, SampleDataError, calib_loader, crop_boxes, load_photos, photo_crop, region,
    sample_crops,
)


def test_photos_load_offline_as_colour():
    photos = load_photos()
    assert tuple(photos) == PHOTOS
    for name, image in photos.items():
        assert image.dtype == torch.uint8 and image.shape[0] == 3, name
        assert max(image.shape[1:]) <= 640, name
        # Colour, not grey stored as RGB: channels must differ somewhere.
        assert not torch.equal(image[0], image[1]), name


def test_crops_shape_dtype_and_range():
    crops = sample_crops(20, seed=0)
    assert crops.shape == (20, 3, 224, 224) and crops.dtype == torch.float32
    assert crops.min() >= -1.0 - 1e-6 and crops.max() <= 1.0 + 1e-6
    # Normalised photos use the range: not all squashed near one value.
    assert crops.min() < -0.8 and crops.max() > 0.8
    assert crops.std(dim=(1, 2, 3)).min() > 0.05


def test_same_seed_same_crops_other_seed_other_crops():
    a = sample_crops(12, seed=7, split="heldout")
    assert torch.equal(a, sample_crops(12, seed=7, split="heldout"))
    assert not torch.equal(a, sample_crops(12, seed=8, split="heldout"))
    # The split is part of the seed: the same seed draws the photos in another order per split.
    assert [b.photo for b in crop_boxes(11, seed=7)] != [b.photo for b in crop_boxes(11, seed=7, split="heldout")]
    # A longer request starts with the shorter one: n only sets how many are drawn.
    assert crop_boxes(30, seed=7)[:12] == crop_boxes(12, seed=7)


def test_photos_include_every_offline_colour_photo_of_the_demo_packages():
    # scikit-image (8, one view of the stereo pair), scikit-learn (2), matplotlib (1).
    assert len(PHOTOS) == 11 and "grace_hopper" in PHOTOS
    assert load_photos()["grace_hopper"].shape == (3, 600, 512)


def _overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise overlap of boxes given as rows (top, bottom, left, right)."""
    # Two boxes overlap iff their row and column intervals both intersect.
    rows = (a[:, None, 0] < b[None, :, 1]) & (b[None, :, 0] < a[:, None, 1])
    cols = (a[:, None, 2] < b[None, :, 3]) & (b[None, :, 2] < a[:, None, 3])
    return rows & cols


def test_regions_are_disjoint_thirds_that_rotate_between_photos():
    photos = load_photos()
    thirds_of_heldout = set()
    for name in PHOTOS:
        height, width = photos[name].shape[1:]
        boxes = np.array([(r.top, r.top + r.height, r.left, r.left + r.width)
                          for r in (region(name, split) for split in SPLITS)])
        overlap = _overlap(boxes, boxes)
        assert not (overlap & ~np.eye(3, dtype=bool)).any(), name
        # Together they tile the photo: no pixel is wasted, and each is about a third.
        areas = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])
        assert areas.sum() == height * width and areas.min() > 0.33 * height * width, name
        h = region(name, "heldout")
        thirds_of_heldout.add((h.top, h.left) == (0, 0))
    # Held-out takes the first third of some photos and a later third of others.
    assert thirds_of_heldout == {True, False}


@pytest.mark.parametrize("seed", [0, 1, 123])
def test_boxes_of_different_splits_never_overlap(seed):
    photos = load_photos()
    boxes = {split: crop_boxes(330 + 110 * i, seed=seed + i, split=split) for i, split in enumerate(SPLITS)}
    for name in PHOTOS:
        height, width = photos[name].shape[1:]
        per_split = {}
        for split, bs in boxes.items():
            b = np.array([(x.top, x.bottom, x.left, x.right) for x in bs if x.photo == name])
            r = region(name, split)
            assert len(b), (name, split)
            # Inside the split's own region, hence inside the photo.
            assert b[:, 0].min() >= r.top and b[:, 1].max() <= r.top + r.height, (name, split)
            assert b[:, 2].min() >= r.left and b[:, 3].max() <= r.left + r.width, (name, split)
            assert r.top + r.height <= height and r.left + r.width <= width
            per_split[split] = b
        for i, first in enumerate(SPLITS):
            for second in SPLITS[i + 1:]:
                assert not _overlap(per_split[first], per_split[second]).any(), (name, first, second)


def test_splits_are_deterministic_and_distinct():
    for split in SPLITS:
        assert crop_boxes(40, seed=3, split=split) == crop_boxes(40, seed=3, split=split)
    crops = {split: sample_crops(4, seed=3, split=split) for split in SPLITS}
    assert torch.equal(crops["validation"], sample_crops(4, seed=3, split="validation"))
    assert not torch.equal(crops["calib"], crops["validation"])
    assert not torch.equal(crops["validation"], crops["heldout"])


def test_boxes_follow_random_resized_crop_rules():
    boxes = crop_boxes(550, seed=5, split="heldout")
    counts = {name: sum(b.photo == name for b in boxes) for name in PHOTOS}
    assert set(counts.values()) == {50}
    flips = sum(b.flip for b in boxes)
    assert 200 < flips < 350
    fractions = []
    for b in boxes:
        r = region(b.photo, "heldout")
        aspect = b.width / b.height
        # 3:4 to 4:3, up to the rounding of the box to whole pixels.
        assert 0.75 * (1 - 2 / b.height) <= aspect <= 4 / 3 * (1 + 2 / b.width), b
        # The area relative to the largest box of the same aspect ratio inside the region.
        full_w = min(r.width, r.height * aspect)
        fractions.append(b.width * b.height / (full_w * full_w / aspect))
        assert 0.2 < fractions[-1] <= 1.02, b
    # Areas are spread over the 25-100 % range, not stuck at one scale.
    assert min(fractions) < 0.3 and max(fractions) > 0.9


def test_crop_shows_its_box():
    """Compare each crop with its box resized by scikit-image (a different resampler)."""
    photos = load_photos()
    boxes = crop_boxes(6, seed=11)
    crops = sample_crops(6, seed=11)
    for box, crop in zip(boxes, crops):
        patch = photos[box.photo][:, box.top:box.bottom, box.left:box.right].numpy()
        ref = resize(patch.transpose(1, 2, 0) / 255.0, (224, 224), anti_aliasing=True)
        ref = (torch.from_numpy(ref.transpose(2, 0, 1)).float() * 255 - 127) / 128
        if box.flip:
            ref = ref.flip(-1)
        assert (crop - ref).abs().mean() < 0.03
        if box.flip or not torch.equal(ref, ref.flip(-1)):
            # The mirror image must fit clearly worse, so the flip really happened as recorded.
            assert (crop - ref.flip(-1)).abs().mean() > (crop - ref).abs().mean()


def test_crops_are_8bit_pixels_on_the_int8_grid_of_the_model_input():
    """Crops are whole 0-255 pixel values normalised as (pixel - 127) / 128: every value is an
    exact multiple of 1/128, so an int8 input quantizer of scale 1/128 represents it exactly."""
    crops = sample_crops(24, seed=5, split="heldout")
    codes = crops * 128
    assert torch.equal(codes, codes.round())
    assert codes.min() >= -127 and codes.max() <= 128
    assert len(codes.unique()) > 200                      # the whole pixel range is in use


def test_calib_loader_batches_the_same_crops():
    loader = calib_loader(70, batch_size=32, seed=2)
    sizes = [len(batch) for batch in loader]
    assert sizes == [32, 32, 6] and len(loader) == 3
    assert torch.equal(torch.cat(list(loader)), sample_crops(70, seed=2))  # re-iterable


def test_photo_crop_is_the_centre_square():
    crop = photo_crop("coffee")
    image = load_photos()["coffee"]                          # 400 x 600
    ref = resize(image[:, :, 100:500].numpy().transpose(1, 2, 0) / 255.0, (224, 224),
                 anti_aliasing=True)
    ref = (torch.from_numpy(ref.transpose(2, 0, 1)).float() * 255 - 127) / 128
    assert crop.shape == (3, 224, 224)
    assert (crop - ref).abs().mean() < 0.03


@pytest.mark.parametrize("call", [
    lambda: sample_crops(0, seed=0),
    lambda: sample_crops(4, seed=0, split="test"),
    lambda: crop_boxes(4, seed=0, split="train"),
    lambda: region("lena", "calib"),
    lambda: calib_loader(4, batch_size=0),
    lambda: photo_crop("lena"),
])
def test_bad_requests_raise(call):
    with pytest.raises(SampleDataError):
        call()
    assert issubclass(SampleDataError, QCompileError)
