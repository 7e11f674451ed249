from __future__ import annotations

import contextlib
import gzip
import time

import cv2
import numpy as np
import nibabel as nib
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from brainmets.inputs.readers import (ImageReadError, ImageTooLarge, UnsupportedFormat, decode_image, read_slice,
                               read_volume, sniff)
from samples import bomb_png, dicom, encode, nifti, tiff_stack

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (40, 56, 3), dtype=np.uint8)
GRAY16 = RNG.integers(0, 65536, (40, 56), dtype=np.uint16)
AFFINE = np.array([[-0.9, 0, 0, 90], [0, 0.9, 0, -120], [0, 0, 3.0, -40], [0, 0, 0, 1]])


@pytest.mark.parametrize("kind, data", [
    ("png", encode(".png", RGB)), ("jpeg", encode(".jpg", RGB)), ("tiff", encode(".tif", RGB)),
    ("webp", encode(".webp", RGB)), ("dicom", dicom(GRAY16)),
    ("nifti", nifti(np.zeros((20, 20, 4), np.int16), AFFINE, gz=False)),
    ("nifti-gz", nifti(np.zeros((20, 20, 4), np.int16), AFFINE)),
])
def test_sniff_reads_the_content_not_the_name(kind, data):
    assert sniff(data) == kind


@pytest.mark.parametrize("data, message", [
    (b"", "empty file"),
    (b"patient,slice\n1,2\n", "unsupported file type"),
    (b"<html><script>alert(1)</script></html>", "unsupported file type"),
    (gzip.compress(b"not a volume" * 100), "unsupported file type"),
])
def test_unusable_bytes_are_refused_saying_what_is_accepted(data, message):
    with pytest.raises(ImageReadError, match=message) as e:
        sniff(data)
    assert "PNG" in str(e.value) and "NIfTI" in str(e.value)


@pytest.mark.parametrize("ext", [".png", ".tif", ".webp"])
def test_lossless_colour_comes_back_exactly_in_file_channel_order(ext):
    params = (cv2.IMWRITE_WEBP_QUALITY, 101) if ext == ".webp" else ()
    np.testing.assert_array_equal(decode_image(encode(ext, RGB, params)), RGB)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_16_bit_keeps_its_depth(ext):
    image = decode_image(encode(ext, GRAY16))
    assert image.dtype == np.uint16
    np.testing.assert_array_equal(image, GRAY16)


def test_jpeg_decodes_close_to_the_original():
    smooth = cv2.GaussianBlur(RGB, (9, 9), 3)
    image = decode_image(encode(".jpg", smooth, (cv2.IMWRITE_JPEG_QUALITY, 95)))
    assert image.shape == smooth.shape and image.dtype == np.uint8
    assert np.abs(image.astype(int) - smooth).mean() < 3


def test_float_tiff_keeps_nan_for_preprocessing_to_refuse():
    values = RNG.random((32, 32)).astype(np.float32)
    values[3, 4] = np.nan
    image = decode_image(encode(".tif", values))
    assert image.dtype == np.float32 and np.isnan(image[3, 4])


def test_dicom_applies_rescale_and_reads_pixel_spacing():
    s = read_slice(dicom(GRAY16, spacing=(0.5, 0.8), slope=2.0, intercept=-100.0))
    assert s.format == "dicom" and s.spacing == (0.5, 0.8)
    np.testing.assert_allclose(s.pixels, GRAY16 * 2.0 - 100.0)


def test_dicom_monochrome1_is_inverted_and_spacing_may_be_unknown():
    s = read_slice(dicom(GRAY16, spacing=None, slope=1.0, intercept=0.0, photometric="MONOCHROME1"))
    assert s.spacing is None
    values = GRAY16.astype(float)
    np.testing.assert_allclose(s.pixels, values.max() + values.min() - values)


def test_raster_slices_have_no_spacing():
    s = read_slice(encode(".png", RGB))
    assert s.spacing is None and s.format == "png" and s.pixels.shape == RGB.shape


@pytest.mark.parametrize("data", [
    encode(".png", RGB), encode(".jpg", RGB), encode(".tif", RGB), dicom(GRAY16),
], ids=["png", "jpeg", "tiff", "dicom"])
def test_truncated_files_are_unreadable(data):
    with pytest.raises(ImageReadError, match="unreadable|truncated|cannot decode"):
        read_slice(data[: len(data) * 2 // 3])


def test_decompression_bomb_is_refused_from_its_header_before_decoding():
    t0 = time.perf_counter()
    with pytest.raises(ImageTooLarge, match="the limit is 25,000,000"):
        decode_image(bomb_png(30000, 30000))
    with pytest.raises(ImageTooLarge, match="6000x6000"):
        decode_image(bomb_png(6000, 6000))
    assert time.perf_counter() - t0 < 0.5


def test_pixel_limit_is_a_parameter():
    with pytest.raises(ImageTooLarge, match="the limit is 1,000"):
        read_slice(encode(".png", RGB), max_pixels=1000)
    with pytest.raises(ImageTooLarge):
        read_slice(dicom(GRAY16), max_pixels=1000)


def test_tiff_stack_is_refused_as_3d():
    with pytest.raises(ImageReadError, match="3 pages"):
        decode_image(tiff_stack([GRAY16.astype(np.uint8)] * 3))


def test_slice_reader_points_volumes_elsewhere_and_dataset_reader_refuses_dicom():
    with pytest.raises(ImageReadError, match="segment it as a volume"):
        read_slice(nifti(np.zeros((20, 20, 3), np.int16), AFFINE))
    with pytest.raises(UnsupportedFormat, match="DICOM"):
        decode_image(dicom(GRAY16))


@pytest.mark.parametrize("gz", [False, True])
def test_nifti_volume_keeps_data_affine_and_voxel_size(gz):
    volume = RNG.integers(0, 900, (24, 20, 5)).astype(np.int16)
    v = read_volume(nifti(volume, AFFINE, gz))
    np.testing.assert_array_equal(v.data, volume)
    np.testing.assert_allclose(v.affine, AFFINE)
    assert v.voxel_mm3 == pytest.approx(0.9 * 0.9 * 3.0)


def test_nifti_limits_shape_voxels_truncation_and_inflation():
    with pytest.raises(ImageReadError, match="1 or 3 channels"):
        read_volume(nifti(np.zeros((20, 20, 4, 2), np.int16), AFFINE))
    with pytest.raises(ImageTooLarge, match="voxels"):
        read_volume(nifti(np.zeros((20, 20, 4), np.int16), AFFINE), max_voxels=1000)
    raw = nifti(np.ones((20, 20, 4), np.int16), AFFINE, gz=False)
    with pytest.raises(ImageReadError, match="truncated"):
        read_volume(raw[:-100])
    # A gzip body that inflates far past what its header declares: refused without inflating it all.
    with pytest.raises(ImageTooLarge, match="inflates past"):
        read_volume(gzip.compress(raw + bytes(50_000_000)))


VALID = {
    "png": encode(".png", RGB), "png16": encode(".png", GRAY16), "jpeg": encode(".jpg", RGB),
    "tiff": encode(".tif", RGB), "webp": encode(".webp", RGB), "dicom": dicom(GRAY16[:16, :16]),
    "nifti": nifti(np.arange(16 * 16 * 3, dtype=np.int16).reshape(16, 16, 3), AFFINE, gz=False),
    "nifti-gz": nifti(np.arange(16 * 16 * 3, dtype=np.int16).reshape(16, 16, 3), AFFINE),
}


# No deadline: what is tested is the outcome; a loaded machine ran single examples 3x slower than usual.
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(VALID)), cut=st.floats(0, 1),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=8))
def test_mangled_files_decode_or_raise_image_read_error(kind, cut, flips):
    """Valid files of every format, truncated and with random bytes overwritten: each reader either
    returns an array or raises ImageReadError (what the API turns into a 4xx); nothing else, no hang."""
    data = bytearray(VALID[kind][: max(1, int(len(VALID[kind]) * (0.5 + cut / 2)))])
    for where, value in flips:
        data[int(where * len(data))] = value
    for read in (read_slice, read_volume):
        try:
            result = read(bytes(data))
        except ImageReadError:
            continue
        assert isinstance(getattr(result, "pixels", getattr(result, "data", None)), np.ndarray)


@settings(max_examples=100, deadline=2000)
@given(st.binary(max_size=2048))
def test_random_bytes_decode_or_raise_image_read_error(data):
    for read in (read_slice, read_volume):
        with contextlib.suppress(ImageReadError):
            read(data)


def test_an_rgb_nifti_is_refused_saying_why():
    image = nib.Nifti1Image(np.zeros((4, 4, 2), [("R", "u1"), ("G", "u1"), ("B", "u1")]), np.eye(4))
    with pytest.raises(ImageReadError, match=r"NIfTI of data type .*RGB or complex voxels\): expected integer or real"):
        read_volume(image.to_bytes())
