"""From probabilities to a binary mask: the one rule used by evaluation, the engine, the API and the page.

A pixel is lesion when its probability reaches the model's threshold; then, slice by slice, connected
components smaller than `min_area` pixels are dropped. Both settings are tuned on the validation
patients (`brainmets ship`) and saved in the model's config, so they hold everywhere the model runs.
"""

from __future__ import annotations

import cv2
import numpy as np


def binarize(probability: np.ndarray, threshold: float, min_area: float = 0) -> np.ndarray:
    """bool mask of one slice (H, W), or of each slice of a stack (N, H, W)."""
    mask = probability >= threshold
    if min_area <= 0:
        return mask
    if mask.ndim == 3:
        return np.stack([binarize(p, threshold, min_area) for p in probability])
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area
    keep[0] = False  # the background
    return keep[labels]
