"""From probabilities to a binary mask: the one rule used by evaluation, the engine, the API and the page.

    mask_slice(probability (H, W), post, scale)   a lone slice: threshold, drop small 2-D components
    mask_stack(probability (N, H, W), post, scale)  a patient's slices in order: threshold, 3-D components
                                                    (26-connected), drop small ones, `single` keeps the strongest

The rule's settings (`PostprocessConfig`) are tuned on the validation patients (`brainmets ship`) and saved in
the model's config, so they hold everywhere the model runs. `scale` is the input's pixel count over the
model's (image_size²), so areas and volumes mean the same tissue at any input size.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

from brainmets.config import PostprocessConfig

FULL_CONNECTIVITY = np.ones((3, 3, 3), bool)  # 26 neighbours: as the evaluation counts 3-D lesions


def binarize(probability: np.ndarray, threshold: float, min_area: float = 0) -> np.ndarray:
    """bool mask of one slice (H, W), or of each slice of a stack (N, H, W) taken alone."""
    mask = probability >= threshold
    if min_area <= 0:
        return mask
    if mask.ndim == 3:
        return np.stack([binarize(p, threshold, min_area) for p in probability])
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area
    keep[0] = False  # the background
    return keep[labels]


def mask_slice(probability: np.ndarray, post: PostprocessConfig, scale: float = 1.0) -> np.ndarray:
    return binarize(probability, post.threshold, post.min_lesion_px * scale)


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """3-D connected components of a bool (N, H, W) stack: labels (0 = background) and their number."""
    return ndimage.label(mask, structure=FULL_CONNECTIVITY)


def keep_components(probability: np.ndarray, labels: np.ndarray, n: int, mode: str, min_voxels: float) -> np.ndarray:
    """The mask of the components `mode` keeps among those with at least `min_voxels` voxels."""
    if n == 0:
        return np.zeros(labels.shape, bool)
    flat = labels.ravel()
    voxels = np.bincount(flat, minlength=n + 1)
    strength = np.bincount(flat, weights=probability.ravel(), minlength=n + 1)
    keep = voxels >= min_voxels
    keep[0] = False
    if mode == "single" and keep.any():
        strongest = int(np.argmax(np.where(keep, strength, -1.0)))
        keep[:] = False
        keep[strongest] = True
    return keep[labels]


def mask_stack(probability: np.ndarray, post: PostprocessConfig, scale: float = 1.0) -> np.ndarray:
    """bool (N, H, W) for a stack of float (N, H, W) probabilities, slices in anatomical order."""
    if probability.ndim != 3:
        raise ValueError(f"expected a stack of probabilities (slices, height, width), got shape {probability.shape}")
    labels, n = components(probability >= post.threshold)
    return keep_components(probability, labels, n, post.mode, post.min_lesion_voxels * scale)
