"""Files of every accepted format, and hostile ones, made in memory for the reader, engine and API tests."""

from __future__ import annotations

import gzip
import struct
import zlib

import cv2
import nibabel as nib
import numpy as np


def encode(ext: str, image: np.ndarray, params: tuple = ()) -> bytes:
    """`image` in RGB order (as the readers return it); OpenCV writes BGR."""
    if image.ndim == 3 and image.shape[2] == 3:
        image = image[..., ::-1]
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(image), params)
    assert ok, f"OpenCV could not write {ext}"
    return buf.tobytes()


def tiff_stack(pages: list[np.ndarray]) -> bytes:
    ok, buf = cv2.imencodemulti(".tif", pages)
    assert ok
    return buf.tobytes()


def dicom(pixels: np.ndarray, spacing: tuple[float, float] | None = (0.5, 0.8), slope: float = 2.0,
          intercept: float = -100.0, photometric: str = "MONOCHROME2") -> bytes:
    """An MR image slice of uint16 stored values; real value = stored * slope + intercept."""
    from dicom_studies import mr_slice, to_bytes

    ds = mr_slice(pixels, RescaleSlope=slope, RescaleIntercept=intercept, PhotometricInterpretation=photometric)
    if spacing:
        ds.PixelSpacing = list(spacing)
    else:
        del ds.PixelSpacing
    return to_bytes(ds)


def nifti(volume: np.ndarray, affine: np.ndarray, gz: bool = True) -> bytes:
    raw = nib.Nifti1Image(volume, affine).to_bytes()
    return gzip.compress(raw) if gz else raw


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header declaring width x height 8-bit gray pixels, with a tiny body: a decompression bomb
    (the real thing deflates to 900 MB of zeros from about 1 MB)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(bytes(width + 1)))
            + png_chunk(b"IEND", b""))


def brain(size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic RGB slice with one bright lesion and its 0/255 mask (conftest's generator)."""
    from conftest import synthetic_slice

    return synthetic_slice(np.random.default_rng(seed), size)
