"""Lesion-wise Dice and HD95 as BraTS-METS 2023 ranks segmentations: pure functions of label volumes.

The challenges' own evaluation code is AGPL-3.0, and `panoptica` (Apache-2.0, which it configures) pins
numpy<2.3, rich<14 and pandas<3, below what is installed here; so the rules are written out here, for one
case (a patient's volume, or any array). They are those of the BraTS-METS 2023 evaluation, which matches by
dilation, not one to one as panoptica's bipartite matching does (the two differ when a prediction covers two
lesions or a lesion is split; tests/test_lesionwise.py gives both):

1. Lesions are connected components with full connectivity (26-connected in 3-D), of the prediction and of
   the ground truth.
2. Ground-truth lesions whose dilations touch are one lesion: the truth is dilated `dilation` times (an
   18-connected step in 3-D, `ndimage.generate_binary_structure(ndim, 2)`), and the truth's voxels in one
   component of the dilated truth form one lesion (BraTS-METS: dilation 1, so lesions two voxels apart or
   closer merge).
3. A ground-truth lesion is found when a predicted component overlaps its dilation (at dilation 1: overlaps
   it or touches it through a face or an edge); all the predicted components that do are its match (a
   component over two lesions counts for both). Its Dice and HD95 are those of the lesion against the union
   of its match; a missed lesion scores Dice 0 and HD95 the penalty (374, the BraTS-METS 2023 value, in mm
   there).
4. A predicted component that overlaps no lesion's dilation is a false lesion: Dice 0, HD95 the penalty.
5. Ground-truth lesions of `smallest` or less (BraTS-METS: 2 mm³; in voxels without a spacing) are left out
   of the scores, found or not; a component matching only such a lesion is not a false lesion.
6. Lesion-wise Dice = sum of the lesions' Dice / (lesions + false lesions); lesion-wise HD95 = (sum of the
   lesions' HD95 + penalty x false lesions) / (lesions + false lesions). A case with neither (no lesion, nothing
   predicted) scores Dice 1 and HD95 0.

HD95 is `metrics.hd95` (MONAI: the larger of the two directed 95th percentiles of edge-to-edge distances) on
the lesion's bounding box, in voxels unless a spacing is given: the reference data carries none, and there the
penalty of 374 is applied as 374 voxels. Label groups (BraTS-METS: whole tumour {1, 2, 3}, tumour core {1, 3},
enhancing tumour {3}) pick which label values form the lesion; the binary masks of the reference data have
one group, the whole lesion (every non-zero label).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from brainmets.metrics import hd95

HD95_PENALTY = 374.0  # BraTS-METS 2023: a missed or false lesion's HD95, in mm there
DILATION = 1  # BraTS-METS 2023: ground-truth lesions dilated once for matching and merging
SMALLEST = 2  # BraTS-METS 2023: ground-truth lesions of 2 mm³ or less left out (voxels without a spacing)
WHOLE_LESION: dict[str, tuple[int, ...] | None] = {"whole lesion": None}  # None: every non-zero label
METS_GROUPS: dict[str, tuple[int, ...] | None] = {"whole tumour": (1, 2, 3), "tumour core": (1, 3),
                                                  "enhancing tumour": (3,)}


@dataclass(frozen=True)
class LesionWise:
    dice: float
    hd95: float
    lesions_true: int  # ground-truth lesions scored (merged by dilation, larger than `smallest`)
    lesions_found: int  # of those, overlapped (dilated) by a predicted component
    lesions_false: int  # predicted components overlapping no (dilated) ground-truth lesion
    lesion_dice: tuple[float, ...] = ()  # per scored ground-truth lesion, in label order
    lesion_hd95: tuple[float, ...] = ()


def lesion_wise(pred: np.ndarray, target: np.ndarray, *, dilation: int = DILATION, smallest: float = SMALLEST,
                penalty: float = HD95_PENALTY, spacing: Sequence[float] | None = None) -> LesionWise:
    """Lesion-wise scores of one binary prediction against one binary ground truth (any shape, same shape).
    With `spacing` (one size per axis), HD95 is in its units and `smallest` a volume in its units cubed."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {target.shape} differ in shape")
    crop = _occupied(pred | target, margin=dilation + 1)  # all the rules need: a volume is mostly empty
    if crop is None:
        return LesionWise(1.0, 0.0, 0, 0, 0)
    pred, target = pred[crop], target[crop]
    full = np.ones((3,) * pred.ndim, bool)
    pred_cc, n_pred = ndimage.label(pred, structure=full)
    if dilation > 0 and target.any():
        step = ndimage.generate_binary_structure(pred.ndim, min(2, pred.ndim))
        reach, n_gt = ndimage.label(ndimage.binary_dilation(target, step, iterations=dilation), structure=full)
    else:
        reach, n_gt = ndimage.label(target, structure=full)
    # The dilations of two merged lesions touch, those of two lesions do not: a lesion's own dilation is its
    # component of the dilated truth, and the lesion is the truth inside it.
    lesion = np.where(target, reach, 0)
    volumes = np.bincount(lesion.ravel(), minlength=n_gt + 1)
    pred_sizes = np.bincount(pred_cc.ravel(), minlength=n_pred + 1)
    both = (reach > 0) & (pred_cc > 0)
    pairs = np.unique(reach[both].astype(np.int64) * (n_pred + 1) + pred_cc[both]) if both.any() else np.empty(0, int)
    matches: dict[int, list[int]] = {}
    for pair in pairs.tolist():
        matches.setdefault(pair // (n_pred + 1), []).append(pair % (n_pred + 1))
    matched = {c for cs in matches.values() for c in cs}
    pred_boxes, lesion_boxes = ndimage.find_objects(pred_cc), ndimage.find_objects(lesion)
    overlap = np.bincount(lesion[pred].ravel(), minlength=n_gt + 1)  # predicted voxels inside each lesion
    voxel = 1.0 if spacing is None else float(np.prod(spacing))
    dices, hds, found = [], [], 0
    for k in range(1, n_gt + 1):
        if volumes[k] * voxel <= smallest:
            continue
        match = matches.get(k, [])
        if not match:
            dices.append(0.0)
            hds.append(float(penalty))
            continue
        found += 1
        dices.append(2 * float(overlap[k]) / (float(volumes[k]) + float(pred_sizes[match].sum())))
        box = _union_box([lesion_boxes[k - 1], *(pred_boxes[c - 1] for c in match)], pred.shape)
        hds.append(float(hd95(np.isin(pred_cc[box], match), lesion[box] == k, spacing=spacing)))
    false = n_pred - len(matched)
    scored = len(dices) + false
    if scored == 0:
        return LesionWise(1.0, 0.0, 0, 0, 0)
    return LesionWise(sum(dices) / scored, (sum(hds) + false * float(penalty)) / scored, len(dices), found, false,
                      tuple(dices), tuple(hds))


def _occupied(mask: np.ndarray, margin: int) -> tuple[slice, ...] | None:
    """The bounding box of the mask's voxels with `margin` voxels around it (inside the array); None if empty."""
    box = []
    for axis, n in enumerate(mask.shape):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if not len(hit):
            return None
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, n)))
    return tuple(box)


def _union_box(boxes: list[tuple[slice, ...]], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The bounding box of these boxes with a voxel of margin: HD95 there sees the same edges as in the whole
    volume, on a small array."""
    return tuple(slice(max(min(b[i].start for b in boxes) - 1, 0), min(max(b[i].stop for b in boxes) + 1, n))
                 for i, n in enumerate(shape))


def lesion_wise_groups(pred: np.ndarray, target: np.ndarray,
                       groups: Mapping[str, tuple[int, ...] | None] = WHOLE_LESION, **rules) -> dict[str, LesionWise]:
    """Lesion-wise scores per label group of two label volumes: each group's labels (None: every non-zero
    label) form the lesion in both. A binary mask is a label volume with one label, the whole lesion."""
    pred, target = np.asarray(pred), np.asarray(target)
    pick = lambda a, labels: a != 0 if labels is None else np.isin(a, labels)  # noqa: E731
    return {name: lesion_wise(pick(pred, labels), pick(target, labels), **rules) for name, labels in groups.items()}
