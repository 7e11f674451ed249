"""Segmentation metrics as pure functions of binary arrays (any shape: a slice or a patient's volume).

Empty cases, written down once: where prediction and ground truth are both empty, Dice and IoU are 1
(nothing to find, nothing claimed); where exactly one is empty they are 0. HD95 is undefined unless
both are non-empty and is then None; means over patients skip it. A lesion is a connected component
(full connectivity: in a volume, touching across slices counts); a ground-truth lesion is detected
when any predicted pixel overlaps it; a predicted component overlapping no lesion is a false positive.
The BraTS-METS lesion-wise Dice and HD95, whose lesions are matched a voxel apart, are in lesionwise.py.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance
from scipy import ndimage


@dataclass(frozen=True)
class Counts:
    tp: int
    fp: int
    fn: int

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @property
    def dice(self) -> float:
        denom = 2 * self.tp + self.fp + self.fn
        return 1.0 if denom == 0 else 2 * self.tp / denom

    @property
    def iou(self) -> float:
        denom = self.tp + self.fp + self.fn
        return 1.0 if denom == 0 else self.tp / denom

    @property
    def precision(self) -> float | None:
        return None if self.tp + self.fp == 0 else self.tp / (self.tp + self.fp)

    @property
    def recall(self) -> float | None:
        return None if self.tp + self.fn == 0 else self.tp / (self.tp + self.fn)


def counts(pred: np.ndarray, target: np.ndarray) -> Counts:
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {target.shape} differ in shape")
    tp = int(np.count_nonzero(pred & target))
    return Counts(tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(target)) - tp)


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    return counts(pred, target).dice


def iou(pred: np.ndarray, target: np.ndarray) -> float:
    return counts(pred, target).iou


def hd95(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float] | None = None) -> float | None:
    """95th-percentile symmetric Hausdorff distance (MONAI: the larger of the two directed 95th percentiles of
    edge-to-edge distances), in pixels, or in the units of `spacing` (one per axis) when given; None if either
    side is empty."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    if not pred.any() or not target.any():
        return None
    as_tensor = lambda a: torch.from_numpy(a)[None, None]  # noqa: E731 - (B, C, spatial...) for MONAI
    with warnings.catch_warnings():  # MONAI warns about its own deprecated internal argument
        warnings.simplefilter("ignore", FutureWarning)
        return float(compute_hausdorff_distance(as_tensor(pred), as_tensor(target), percentile=95,
                                                spacing=None if spacing is None else list(spacing))[0, 0])


@dataclass(frozen=True)
class Detection:
    lesions: int  # ground-truth components
    detected: int  # of those, overlapped by the prediction
    false_positives: int  # predicted components overlapping no lesion


def detection(pred: np.ndarray, target: np.ndarray) -> Detection:
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    full = np.ones((3,) * pred.ndim, bool)
    gt_labels, n_gt = ndimage.label(target, structure=full)
    pred_labels, n_pred = ndimage.label(pred, structure=full)
    detected = len(np.unique(gt_labels[pred & (gt_labels > 0)]))
    hit_preds = len(np.unique(pred_labels[target & (pred_labels > 0)]))
    return Detection(n_gt, detected, n_pred - hit_preds)
