"""Sample crops: offline photos, determinism, normalisation, and disjoint calib/held-out boxes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.transform import resize

from qcompiler.errors import QCompileError
from qcompiler.sample_data import (
    PHOTOS, SampleDataError, calib_loader, crop_boxes, load_photos, photo_crop, sample_crops,
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
    assert crop_boxes(12, seed=7) != crop_boxes(12, seed=7, split="heldout")
    # A longer request starts with the shorter one: n only sets how many are drawn.
    assert crop_boxes(30, seed=7)[:12] == crop_boxes(12, seed=7)


@pytest.mark.parametrize("seed", [0, 1, 123])
def test_calib_and_heldout_boxes_never_overlap(seed):
    photos = load_photos()
    calib = crop_boxes(400, seed=seed, split="calib")
    heldout = crop_boxes(600, seed=seed + 1, split="heldout")
    for name in PHOTOS:
        c = np.array([(b.top, b.bottom, b.left, b.right) for b in calib if b.photo == name])
        h = np.array([(b.top, b.bottom, b.left, b.right) for b in heldout if b.photo == name])
        assert len(c) and len(h)
        # Two boxes overlap iff their row and column intervals both intersect.
        rows = (c[:, None, 0] < h[None, :, 1]) & (h[None, :, 0] < c[:, None, 1])
        cols = (c[:, None, 2] < h[None, :, 3]) & (h[None, :, 2] < c[:, None, 3])
        assert not (rows & cols).any(), name
        height, width = photos[name].shape[1:]
        assert c[:, 0].min() >= 0 and c[:, 1].max() <= height
        assert h[:, 0].min() >= 0 and h[:, 1].max() <= height
        assert c[:, 2].min() >= 0 and h[:, 3].max() <= width


def test_boxes_follow_random_resized_crop_rules():
    photos = load_photos()
    boxes = crop_boxes(500, seed=5, split="heldout")
    counts = {name: sum(b.photo == name for b in boxes) for name in PHOTOS}
    assert set(counts.values()) == {50}
    flips = sum(b.flip for b in boxes)
    assert 180 < flips < 320
    fractions = []
    for b in boxes:
        height, width = photos[b.photo].shape[1:]
        region_area = height * (width - width // 2)
        fractions.append(b.height * b.width / region_area)
        assert 0.2 < fractions[-1] <= 1.0
    # Areas are spread over the 25-100 % range, not stuck at one scale.
    assert min(fractions) < 0.35 and max(fractions) > 0.85


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
    lambda: calib_loader(4, batch_size=0),
    lambda: photo_crop("lena"),
])
def test_bad_requests_raise(call):
    with pytest.raises(SampleDataError):
        call()
    assert issubclass(SampleDataError, QCompileError)
