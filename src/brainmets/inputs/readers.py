"""Decode the files MRI comes in: raster slices (TIFF, PNG, WebP, JPEG), DICOM slices, NIfTI volumes.

Everything here reads untrusted bytes. The format is sniffed from the content (never the file name),
sizes are checked from the header before any pixel is decoded (decompression bombs), and every
failure of a decoder on the bytes becomes an `ImageReadError` that says what was expected.
"""

from __future__ import annotations

import io
import math
import zlib
from dataclasses import dataclass

import cv2
import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut

ACCEPTED = "PNG, JPEG, TIFF, WebP, DICOM (.dcm) or NIfTI (.nii, .nii.gz)"
RASTER = ("png", "jpeg", "tiff", "webp")
# 25 Mpx (5000²) is 24x the largest MRI slice matrix in use (1024²); its float32 copy is 100 MB.
MAX_PIXELS = 25_000_000
# 64 Mvoxels holds a 512x512x256 volume; a float32 copy of one is 256 MB.
MAX_VOXELS = 64 * 2**20
MAX_NIFTI_OFFSET = 2**24  # header extensions before the voxels: kilobytes in practice
# Pillow refuses images past twice this (its own decompression-bomb guard) and warns past it.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class ImageReadError(ValueError):
    """The bytes are not a readable image; the message says why."""


class UnsupportedFormat(ImageReadError):
    """The bytes are of no accepted format."""


class ImageTooLarge(ImageReadError):
    """The header declares more pixels or voxels than the limit (a decompression bomb, or a mistake)."""


@dataclass(frozen=True)
class Slice:
    pixels: np.ndarray  # (H, W) or (H, W, C), the file's dtype after any rescale
    spacing: tuple[float, float] | None = None  # mm per pixel (between rows, between columns), if known
    format: str = ""


@dataclass(frozen=True)
class Volume:
    data: np.ndarray  # (X, Y, Z) or (X, Y, Z, C) in the file's voxel order, scaled by scl_slope/scl_inter
    affine: np.ndarray  # (4, 4) voxel -> world, mm
    header: nib.Nifti1Header

    @property
    def voxel_mm3(self) -> float:
        return float(abs(np.prod(self.header.get_zooms()[:3])))


def sniff(data: bytes) -> str:
    """'png', 'jpeg', 'tiff', 'webp', 'dicom', 'nifti' or 'nifti-gz', from the first bytes."""
    if not data:
        raise ImageReadError(f"empty file: expected {ACCEPTED}")
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[128:132] == b"DICM":
        return "dicom"
    if _nifti_header_size(data):
        return "nifti"
    if data.startswith(b"\x1f\x8b"):
        head = _gunzip(data, 544, truncate=True)
        if _nifti_header_size(head):
            return "nifti-gz"
    raise UnsupportedFormat(f"unsupported file type: expected {ACCEPTED}")


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A raster file (TIFF, PNG, WebP, JPEG) as (H, W) or (H, W, C) in the file's dtype, RGB(A) order.

    OpenCV decodes colour as BGR; we flip back so channel 0 is the file's first channel (pre-contrast
    in the reference data), the same order as every other reader.
    """
    kind = sniff(data)
    if kind not in RASTER:
        raise UnsupportedFormat(f"expected a TIFF, PNG, WebP or JPEG image, got {kind.upper()}")
    _check_raster_header(data, kind, max_pixels)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:  # OpenCV raises on some malformed files where it returns None on others
        image = None
    if image is None or image.size == 0:
        raise ImageReadError(f"unreadable or truncated {kind.upper()} image")
    if image.ndim == 3 and image.shape[2] == 3:
        image = image[..., ::-1]
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[..., [2, 1, 0, 3]]
    return np.ascontiguousarray(image)


def read_slice(data: bytes, max_pixels: int = MAX_PIXELS) -> Slice:
    """One 2-D slice from a raster or DICOM file; a NIfTI volume is refused with a pointer to read_volume."""
    kind = sniff(data)
    if kind == "dicom":
        return _read_dicom(data, max_pixels)
    if kind.startswith("nifti"):
        raise ImageReadError("this is a NIfTI volume, not a single slice: segment it as a volume")
    return Slice(decode_image(data, max_pixels), None, kind)


def read_volume(data: bytes, max_voxels: int = MAX_VOXELS) -> Volume:
    """A NIfTI-1 or -2 volume (.nii or .nii.gz): 3-D, or 4-D with 1 or 3 channels."""
    kind = sniff(data)
    if not kind.startswith("nifti"):
        raise UnsupportedFormat(f"expected a NIfTI volume (.nii or .nii.gz), got {kind.upper()}")
    head = _gunzip(data, 544, truncate=True) if kind == "nifti-gz" else data
    image_class = nib.Nifti2Image if _nifti_header_size(head) == 540 else nib.Nifti1Image
    try:
        header = image_class.header_class.from_fileobj(io.BytesIO(head))
        shape = header.get_data_shape()
        offset = int(header["vox_offset"])
        itemsize = header.get_data_dtype().itemsize
    except Exception as e:  # any failure of the parser on these bytes means a broken header
        raise ImageReadError(f"unreadable NIfTI header ({e})") from e
    if not 0 <= offset <= MAX_NIFTI_OFFSET:
        raise ImageReadError(f"NIfTI header puts the voxel data at byte {offset:,}; expected 0 to {MAX_NIFTI_OFFSET:,}")
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)) or min(shape) < 1:
        raise ImageReadError(f"NIfTI of shape {shape}: expected a 3-D volume, or 4-D with 1 or 3 channels")
    voxels = math.prod(shape[:3])  # Python ints: NIfTI-2's 64-bit sizes cannot wrap around
    if voxels > max_voxels:
        raise ImageTooLarge(f"NIfTI declares {'x'.join(map(str, shape))} = {voxels:,} voxels; "
                            f"the limit is {max_voxels:,}")
    length = offset + math.prod(shape) * itemsize
    raw = _gunzip(data, length) if kind == "nifti-gz" else data
    if len(raw) < length:
        raise ImageReadError(f"truncated NIfTI: {len(raw):,} of the {length:,} bytes its header declares")
    try:
        image = image_class.from_bytes(raw)
        array = np.asanyarray(image.dataobj)  # applies scl_slope / scl_inter
    except Exception as e:  # any failure of nibabel on these bytes means a broken file
        raise ImageReadError(f"unreadable NIfTI volume ({e})") from e
    if array.dtype.fields is not None or array.dtype.kind not in "biuf":
        raise ImageReadError(f"NIfTI of data type {image.header.get_data_dtype()} (RGB or complex voxels): expected "
                             f"integer or real intensities, one volume per sequence")
    if not _geometry_ok(image):
        raise ImageReadError("NIfTI header holds a NaN, infinite or degenerate voxel size or orientation (pixdim, "
                             "quatern_*, srow_*): expected finite numbers and three independent axes")
    return Volume(array, image.affine, image.header)


def _geometry_ok(image: nib.Nifti1Image) -> bool:
    """Slicing reorients by the affine and the mask is written back with the same qform and sform: a NaN in
    any of them, a quaternion nibabel refuses, or axes that collapse would fail there, after the work."""
    try:
        geometry = (image.affine, image.header.get_qform(), image.header.get_sform(), image.header.get_zooms())
        return (all(np.isfinite(g).all() for g in geometry)
                and not np.isnan(nib.orientations.io_orientation(image.affine)).any())
    except ValueError:  # nibabel's refusals (quatern_b, c, d longer than 1) and numpy's LinAlgError
        return False


def _check_raster_header(data: bytes, kind: str, max_pixels: int) -> None:
    """Size and page count from the header alone (Pillow parses it lazily), before decoding any pixel."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            pages = getattr(im, "n_frames", 1)
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{kind.upper()} declares over {2 * Image.MAX_IMAGE_PIXELS:,} pixels (a decompression "
                            f"bomb?); the limit is {max_pixels:,}") from e
    except Exception as e:  # any failure of the header parser on these bytes means a broken file
        raise ImageReadError(f"unreadable or truncated {kind.upper()} image") from e
    _check_pixels(width, height, max_pixels, kind)
    if pages > 1:
        raise ImageReadError(f"{kind.upper()} holds {pages} pages (a 3-D stack); expected one 2-D slice "
                             f"(send a volume as NIfTI)")


def _check_pixels(width: int, height: int, max_pixels: int, kind: str) -> None:
    if width * height > max_pixels:
        raise ImageTooLarge(f"{kind.upper()} declares {width}x{height} = {width * height:,} pixels; "
                            f"the limit is {max_pixels:,}")


def _read_dicom(data: bytes, max_pixels: int) -> Slice:
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as e:  # any failure of the parser on these bytes means a broken file
        raise _unreadable_dicom(e) from e
    return dicom_slice(ds, max_pixels)


def dicom_slice(ds: pydicom.Dataset, max_pixels: int = MAX_PIXELS) -> Slice:
    """Pixels with the modality LUT or rescale slope/intercept applied (stored values -> e.g. HU)."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
        has_pixels = "PixelData" in ds
    except Exception as e:  # any failure of the parser on these bytes means a broken file
        raise _unreadable_dicom(e) from e
    if not has_pixels:
        raise ImageReadError("DICOM without pixel data: expected an image slice")
    _check_pixels(columns, rows, max_pixels, "dicom")
    if frames > 1:
        raise ImageReadError(f"DICOM holds {frames} frames (a 3-D stack); expected one 2-D slice "
                             f"(send a volume as NIfTI)")
    try:
        pixels = ds.pixel_array
        monochrome = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).startswith("MONOCHROME")
        if monochrome:
            pixels = apply_modality_lut(pixels, ds)
    except Exception as e:  # truncated pixel data, or a compression with no decoder installed
        raise ImageReadError(f"cannot decode the DICOM pixel data ({str(e).splitlines()[0]})") from e
    if monochrome and ds.get("PhotometricInterpretation") == "MONOCHROME1":  # stored inverted: 0 is white
        pixels = pixels.astype(np.float64)  # max + min would wrap around in the stored integer type
        pixels = pixels.max() + pixels.min() - pixels
    return Slice(np.ascontiguousarray(pixels), dicom_slice_spacing(ds), "dicom")


def _unreadable_dicom(e: Exception) -> ImageReadError:
    return ImageReadError(f"unreadable DICOM ({str(e).splitlines()[0] if str(e) else type(e).__name__})")


def dicom_slice_spacing(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """(mm between rows, between columns), or None (areas unknown) unless two numbers in (0, 1000): a
    malformed value must not fail the request, and a pixel over a metre wide is no MRI (inf mm² areas)."""
    try:
        rows, columns = (float(v) for v in ds.get("PixelSpacing") or ())
    except (TypeError, ValueError):
        return None
    return (rows, columns) if 0 < rows < 1000 and 0 < columns < 1000 else None


def _nifti_header_size(data: bytes) -> int:
    """348 (NIfTI-1) or 540 (NIfTI-2) if the bytes start with a NIfTI header, else 0."""
    if len(data) >= 348 and data[344:348] in (b"n+1\x00", b"ni1\x00"):
        return 348
    if len(data) >= 540 and data[4:8] in (b"n+2\x00", b"ni2\x00"):
        return 540
    return 0


def _gunzip(data: bytes, limit: int, truncate: bool = False) -> bytes:
    """At most `limit` bytes of gzip data, so a tiny upload cannot inflate into gigabytes."""
    try:
        out = zlib.decompressobj(wbits=31).decompress(data, limit + 1)
    except zlib.error as e:
        if truncate:
            return b""
        raise ImageReadError(f"corrupt gzip data ({e})") from e
    if len(out) > limit and not truncate:
        raise ImageTooLarge(f"gzip data inflates past the {limit:,} bytes its NIfTI header declares")
    return out[:limit]
