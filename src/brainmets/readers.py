"""Decode raster image files (TIFF, PNG, WebP, JPEG) into arrays with channels in file order."""

from __future__ import annotations

import cv2
import numpy as np


class ImageReadError(ValueError):
    """The bytes are not a readable image; the message says why."""


def decode_image(data: bytes) -> np.ndarray:
    """(H, W) or (H, W, C) array in the file's dtype (uint8 or uint16), RGB(A) channel order.

    OpenCV decodes colour as BGR; we flip back so channel 0 is the file's first channel (pre-contrast
    in the reference data), the same order as every other reader.
    """
    if not data:
        raise ImageReadError("empty file")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise ImageReadError("unreadable or truncated image (expected TIFF, PNG, WebP or JPEG)")
    if image.ndim == 3 and image.shape[2] == 3:
        image = image[..., ::-1]
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[..., [2, 1, 0, 3]]
    return np.ascontiguousarray(image)
