"""The one preprocessing of brainmets, used by training, evaluation, the inference engine and the app.

    preprocess(image) = normalize(enhance(image))

`enhance` turns any accepted slice into a uint8 (S, S, 3) image: channels made three, 16-bit or float
intensities rescaled per channel from their min-max to 8 bits (the models were trained on the 8-bit
reference data), resized to S x S, then CLAHE on each channel. `normalize` maps it to float32 (3, S, S)
in [0, 1]. The dataset cache stores `enhance`'s uint8 output, so training sees bit-for-bit what
`preprocess` gives at serving time.

Accepted input: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4: alpha dropped); uint8, uint16 or float.
A single channel is repeated to three, as the dataset itself stands FLAIR in for missing sequences.
"""

from __future__ import annotations

import cv2
import numpy as np

from brainmets.config import PreprocessConfig

MIN_SIDE = 16  # below this CLAHE tiles and the network's 4 poolings have nothing left to work on


def to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """Three uint8 channels, (H, W, 3). Raises ValueError saying what shape or values were wrong."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {image.shape}")
    if min(image.shape[:2]) < MIN_SIDE:
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]} px; at least {MIN_SIDE}x{MIN_SIDE} is needed")
    if image.dtype == np.uint8:
        return image
    if image.dtype == bool or not np.issubdtype(image.dtype, np.number):
        raise ValueError(f"expected integer or float pixel values, got {image.dtype}")
    values = image.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError("image holds NaN or infinite values")
    lo = values.min(axis=(0, 1), keepdims=True)
    span = values.max(axis=(0, 1), keepdims=True) - lo
    scaled = np.divide(values - lo, span, out=np.zeros_like(values), where=span > 0)
    return np.round(scaled * 255).astype(np.uint8)


def enhance(image: np.ndarray, cfg: PreprocessConfig = PreprocessConfig()) -> np.ndarray:
    """uint8 (S, S, 3): to three 8-bit channels, resize to S x S, CLAHE per channel."""
    rgb = to_uint8_rgb(image)
    size = cfg.image_size
    if rgb.shape[:2] != (size, size):
        shrinking = max(rgb.shape[:2]) > size
        rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    clahe = cv2.createCLAHE(clipLimit=cfg.clahe_clip, tileGridSize=(cfg.clahe_tile, cfg.clahe_tile))
    return np.stack([clahe.apply(np.ascontiguousarray(rgb[..., c])) for c in range(3)], axis=2)


def normalize(enhanced: np.ndarray) -> np.ndarray:
    """uint8 (..., S, S, 3) -> float32 (..., 3, S, S) in [0, 1]."""
    return np.moveaxis(enhanced.astype(np.float32) / 255.0, -1, -3)


def preprocess(image: np.ndarray, cfg: PreprocessConfig = PreprocessConfig()) -> np.ndarray:
    """Any accepted slice -> float32 (3, S, S) in [0, 1], exactly as the models were trained."""
    return normalize(enhance(image, cfg))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of a 0/1 mask to (size, size), so it stays binary."""
    if mask.shape[:2] == (size, size):
        return mask
    return cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
