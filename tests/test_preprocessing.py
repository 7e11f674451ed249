"""The one preprocessing: any accepted slice -> float32 (3, S, S) in [0, 1]; bad input refused with a reason."""

from __future__ import annotations

import numpy as np
import pytest

from brainmets.config import PreprocessConfig
from brainmets.preprocessing import MIN_SIDE, enhance, normalize, preprocess, resize_mask, to_uint8_rgb

PRE = PreprocessConfig(image_size=64)


def ramp(shape, dtype, top) -> np.ndarray:
    """Values spread evenly from 0 to `top` over the whole array."""
    return np.linspace(0, top, int(np.prod(shape))).reshape(shape).astype(dtype)


def check(out: np.ndarray, size: int = 64) -> None:
    assert out.dtype == np.float32 and out.shape == (3, size, size)
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out.max() > out.min()  # an image with contrast keeps it


@pytest.mark.parametrize("shape", [(64, 64), (64, 64, 1), (64, 64, 3), (64, 64, 4)])
@pytest.mark.parametrize("dtype, top", [(np.uint8, 255), (np.uint16, 65535), (np.float32, 1.0), (np.float64, 3e3)])
def test_range_dtype_and_shape(shape, dtype, top):
    check(preprocess(ramp(shape, dtype, top), PRE))


def test_one_channel_is_repeated():
    grey = ramp((64, 64), np.uint8, 255)
    out = preprocess(grey, PRE)
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])
    np.testing.assert_array_equal(out, preprocess(grey[..., None], PRE))
    np.testing.assert_array_equal(out, preprocess(np.repeat(grey[..., None], 3, axis=2), PRE))


def test_channels_kept_in_order_and_alpha_dropped():
    rgb = np.stack([ramp((64, 64), np.uint8, 255), np.full((64, 64), 7, np.uint8), np.zeros((64, 64), np.uint8)], 2)
    out = preprocess(rgb, PRE)
    assert out[0].std() > 0.1 and out[1].std() == 0 and out[2].std() == 0 and out[1].max() > out[2].max()
    rgba = np.concatenate([rgb, np.full((64, 64, 1), 255, np.uint8)], axis=2)
    np.testing.assert_array_equal(preprocess(rgba, PRE), out)


def test_sixteen_bit_rescaled_to_eight():
    u16 = np.repeat(ramp((64, 64, 1), np.uint16, 65535), 3, axis=2)
    u8 = to_uint8_rgb(u16)
    assert u8.dtype == np.uint8 and u8.min() == 0 and u8.max() == 255
    np.testing.assert_array_equal(u8, np.round(u16 / 65535 * 255).astype(np.uint8))
    # an 8-bit image stored as 16 bits (x257) preprocesses like the 8-bit original
    full8 = np.repeat(ramp((64, 64, 1), np.uint8, 255), 3, axis=2)
    np.testing.assert_array_equal(preprocess(full8.astype(np.uint16) * 257, PRE), preprocess(full8, PRE))


def test_float_rescaled_per_channel_and_flat_channel_is_zero():
    x = np.zeros((64, 64, 3), np.float32)
    x[..., 0] = ramp((64, 64), np.float32, 1.0)
    x[..., 1] = ramp((64, 64), np.float32, 1.0) * 1000 - 500  # another range, same picture
    x[..., 2] = 0.25  # flat: nothing to stretch
    u8 = to_uint8_rgb(x)
    np.testing.assert_array_equal(u8[..., 0], u8[..., 1])
    assert u8[..., 0].min() == 0 and u8[..., 0].max() == 255 and (u8[..., 2] == 0).all()


def test_signed_integers_rescaled():
    """DICOM pixels are often int16 with negative values."""
    x = (ramp((64, 64), np.float64, 2000) - 1000).astype(np.int16)
    u8 = to_uint8_rgb(x)
    assert u8[..., 0].min() == 0 and u8[..., 0].max() == 255
    np.testing.assert_array_equal(u8[..., 0], to_uint8_rgb((x.astype(np.int32) + 1000).astype(np.uint16))[..., 0])


def test_uint8_passes_unchanged_into_enhance():
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    assert to_uint8_rgb(image) is image or np.array_equal(to_uint8_rgb(image), image)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_infinity_rejected(bad):
    x = ramp((64, 64), np.float32, 1.0)
    x[3, 4] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        preprocess(x, PRE)


@pytest.mark.parametrize("shape", [(MIN_SIDE - 1, 64), (64, MIN_SIDE - 1, 3), (8, 8)])
def test_too_small_rejected(shape):
    with pytest.raises(ValueError, match=f"at least {MIN_SIDE}x{MIN_SIDE}"):
        preprocess(ramp(shape, np.uint8, 255), PRE)
    check(preprocess(ramp((MIN_SIDE, MIN_SIDE), np.uint8, 255), PRE))


@pytest.mark.parametrize("shape", [(64,), (64, 64, 2), (2, 64, 64, 3), (64, 64, 5)])
def test_bad_shapes_rejected(shape):
    with pytest.raises(ValueError, match="expected an image of shape"):
        preprocess(np.zeros(shape, np.uint8), PRE)


def test_bool_and_text_pixels_rejected():
    with pytest.raises(ValueError, match="integer or float"):
        preprocess(np.ones((64, 64), bool), PRE)
    with pytest.raises(ValueError, match="integer or float"):
        preprocess(np.full((64, 64), "a"), PRE)


@pytest.mark.parametrize("hw", [(64, 64), (100, 80), (32, 48), (512, 512), (17, 300)])
def test_resized_to_the_model_size(hw):
    check(preprocess(ramp(hw, np.uint8, 255), PRE))
    check(preprocess(ramp(hw, np.uint8, 255), PreprocessConfig(image_size=32)), 32)


def test_resize_keeps_the_picture():
    """A bright left half stays the bright left half, whatever the input size."""
    for h, w in [(64, 64), (128, 96), (40, 40)]:
        x = np.zeros((h, w), np.uint8)
        x[:, : w // 2] = 200
        out = enhance(x, PRE)
        assert out[:, :28].min() > out[:, 36:].max()


def test_clahe_settings_matter():
    image = (np.random.default_rng(1).normal(80, 20, (64, 64, 3))).clip(0, 255).astype(np.uint8)
    a = enhance(image, PRE)
    # OpenCV scales the clip limit by tile area / 256: on 8x8-px tiles, 2 and 4 both round to 1
    assert not np.array_equal(a, enhance(image, PreprocessConfig(image_size=64, clahe_clip=12.0)))
    assert not np.array_equal(a, enhance(image, PreprocessConfig(image_size=64, clahe_tile=4)))
    np.testing.assert_array_equal(a, enhance(image.copy(), PreprocessConfig(image_size=64)))


def test_normalize_is_the_second_half_of_preprocess():
    image = (np.random.default_rng(2).random((70, 90, 3)) * 255).astype(np.uint8)
    e = enhance(image, PRE)
    assert e.dtype == np.uint8 and e.shape == (64, 64, 3)
    np.testing.assert_array_equal(normalize(e), preprocess(image, PRE))
    np.testing.assert_array_equal(normalize(e)[1], e[..., 1].astype(np.float32) / 255)
    batch = np.stack([e, e])
    assert normalize(batch).shape == (2, 3, 64, 64)


def test_resize_mask_stays_binary():
    mask = np.zeros((100, 80), np.uint8)
    mask[10:50, 20:60] = 1
    small = resize_mask(mask, 64)
    assert small.shape == (64, 64) and set(np.unique(small)) == {0, 1}
    assert abs(small.mean() - mask.mean()) < 0.02
    assert resize_mask(small, 64) is small
