"""Training augmentation: image and mask move together, the mask stays binary, crops are the right size and
mostly hold lesion pixels."""

from __future__ import annotations

import dataclasses

import albumentations as A
import numpy as np
import pytest

from brainmets.augmentation import train_transform
from brainmets.config import make_config
from brainmets.metrics import dice
from conftest import tiny_config


def lesion_slice(size: int = 64, box=(10, 30, 36, 44)) -> tuple[np.ndarray, np.ndarray]:
    """A dark image whose only bright pixels are an off-centre, non-square lesion, and its 0/1 mask."""
    image = np.full((size, size, 3), 20, np.uint8)
    mask = np.zeros((size, size), np.uint8)
    top, bottom, left, right = box
    mask[top:bottom, left:right] = 1
    image[mask > 0] = (200, 180, 160)
    return image, mask


def assert_aligned(image: np.ndarray, mask: np.ndarray) -> None:
    assert set(np.unique(mask)) <= {0, 1}, f"mask not binary: {np.unique(mask)}"
    bright = image[..., 0] > 110
    if not mask.any():
        assert bright.mean() < 0.01  # lesion moved out of view in both
        return
    assert dice(bright, mask) > 0.9
    assert image[mask > 0, 0].mean() > 150 and image[mask == 0, 0].mean() < 60
    assert image[..., 0].mean() > image[..., 2].mean() or not bright.any()  # channels not mixed up


def steps(cfg) -> list:
    return list(train_transform(cfg).transforms)


@pytest.mark.parametrize("index", range(4))
def test_every_step_moves_image_and_mask_together(index):
    """Each transform alone, forced to apply, on many random draws."""
    cfg = tiny_config(crop_size=32, rotate_deg=30.0, scale=(0.8, 1.2))
    step = steps(cfg)[index]
    step.p = 1.0
    single = A.Compose([step], seed=index)
    image, mask = lesion_slice()
    changed = 0
    for _ in range(25):
        out = single(image=image, mask=mask)
        assert_aligned(out["image"], out["mask"])
        changed += not np.array_equal(out["mask"], mask)
    assert changed > 0  # the step did something to check


def test_whole_pipeline_keeps_alignment_and_sizes():
    cfg = tiny_config(crop_size=32)
    transform = train_transform(cfg)
    image, mask = lesion_slice()
    for _ in range(60):
        out = transform(image=image, mask=mask)
        assert out["image"].shape == (32, 32, 3) and out["image"].dtype == np.uint8
        assert out["mask"].shape == (32, 32) and out["mask"].dtype == np.uint8
        assert_aligned(out["image"], out["mask"])


def test_flips_and_rotation_change_the_lesion_position():
    """The off-centre lesion ends up in several places: the augmentation really moves both."""
    cfg = dataclasses.replace(tiny_config(), crop_size=None)  # make_config skips None overrides
    transform = train_transform(cfg)
    image, mask = lesion_slice()
    centres = set()
    for _ in range(40):
        out = transform(image=image, mask=mask)
        assert out["image"].shape == (64, 64, 3) and out["mask"].shape == (64, 64)
        assert_aligned(out["image"], out["mask"])
        ys, xs = np.nonzero(out["mask"])
        centres.add((ys.mean() > 32, xs.mean() > 32))
    assert len(centres) == 4  # lesion seen in all four quadrants


@pytest.mark.parametrize("crop", [16, 32, 48, 64])
def test_crop_sizes(crop):
    transform = train_transform(tiny_config(crop_size=crop))
    image, mask = lesion_slice()
    for _ in range(5):
        out = transform(image=image, mask=mask)
        assert out["image"].shape == (crop, crop, 3) and out["mask"].shape == (crop, crop)


def crop_hit_rate(lesion_crop_prob: float, draws: int = 300) -> float:
    # no rotation or zoom: the small corner lesion then stays in view, and only the crop choice matters
    cfg = tiny_config(crop_size=32, lesion_crop_prob=lesion_crop_prob, rotate_deg=0.0, scale=(1.0, 1.0))
    transform = train_transform(cfg)
    image, mask = lesion_slice(box=(4, 8, 4, 8))
    return float(np.mean([transform(image=image, mask=mask)["mask"].any() for _ in range(draws)]))


def test_lesion_centred_crops_hold_lesion_pixels_most_of_the_time():
    assert crop_hit_rate(0.6) > 0.55
    assert crop_hit_rate(1.0) == 1.0
    assert crop_hit_rate(0.0) < 0.2  # random crops alone seldom find a 4-px lesion in a corner


def test_seeded_transform_is_reproducible():
    image, mask = lesion_slice()
    runs = []
    for _ in range(2):
        transform = train_transform(tiny_config(crop_size=32))
        transform.set_random_seed(1234)
        runs.append([transform(image=image, mask=mask)["mask"] for _ in range(5)])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_missing_sequence_puts_flair_in_t1_channels_and_leaves_the_mask():
    from brainmets.augmentation import MissingSequence

    image = np.stack([np.full((16, 16), v, np.uint8) for v in (10, 20, 30)], axis=-1)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8] = 1
    seen = set()
    t = MissingSequence(p=1.0)
    for seed in range(40):
        t.set_random_seed(seed)
        out = t(image=image, mask=mask)
        np.testing.assert_array_equal(out["mask"], mask)
        assert (out["image"][..., 1] == 20).all()
        seen.add(tuple(int(out["image"][0, 0, c]) for c in (0, 2)))
    assert seen == {(20, 30), (10, 20), (20, 20)}  # pre, post or both replaced, never neither
    np.testing.assert_array_equal(image[..., 0], 10)  # the input is not modified


def test_missing_sequence_is_in_the_fast_recipe_not_in_the_seed_one():
    names = lambda cfg: [type(t).__name__ for t in train_transform(cfg).transforms]  # noqa: E731
    assert make_config("attention-unet").missing_sequence_p == 0.3
    assert "MissingSequence" in names(make_config("attention-unet"))
    assert "MissingSequence" not in names(make_config("attention-unet", "seed"))
    assert "MissingSequence" not in names(tiny_config(missing_sequence_p=0.0))
