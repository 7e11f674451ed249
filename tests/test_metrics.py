"""Metrics against values worked out by hand on tiny arrays."""

from __future__ import annotations

import numpy as np
import pytest

from brainmets.metrics import Counts, counts, detection, dice, hd95, iou


def grid(*cells, shape=(6, 6)) -> np.ndarray:
    a = np.zeros(shape, bool)
    for cell in cells:
        a[cell] = True
    return a


# pred: 4 px, target: 6 px, 3 of them shared
PRED = grid((0, 0), (0, 1), (0, 2), (5, 5))
TARGET = grid((0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2))


def test_overlap_by_hand():
    c = counts(PRED, TARGET)
    assert (c.tp, c.fp, c.fn) == (3, 1, 3)
    assert dice(PRED, TARGET) == pytest.approx(2 * 3 / (4 + 6))
    assert iou(PRED, TARGET) == pytest.approx(3 / 7)
    assert c.precision == pytest.approx(3 / 4) and c.recall == pytest.approx(3 / 6)
    assert dice(TARGET, TARGET) == 1.0 and iou(TARGET, TARGET) == 1.0


def test_inputs_taken_as_binary():
    assert dice(PRED.astype(np.uint8) * 255, TARGET.astype(np.float32)) == pytest.approx(0.6)


def test_both_empty_scores_one_and_precision_recall_undefined():
    empty = np.zeros((4, 4), bool)
    c = counts(empty, empty)
    assert (dice(empty, empty), iou(empty, empty)) == (1.0, 1.0)
    assert c.precision is None and c.recall is None


def test_one_side_empty_scores_zero():
    empty = np.zeros((6, 6), bool)
    missed = counts(empty, TARGET)  # nothing predicted, lesion there
    assert (missed.dice, missed.iou, missed.recall, missed.precision) == (0.0, 0.0, 0.0, None)
    invented = counts(PRED, empty)  # prediction where there is no lesion
    assert (invented.dice, invented.iou, invented.precision, invented.recall) == (0.0, 0.0, 0.0, None)


def test_counts_add_up():
    total = counts(PRED, TARGET) + counts(TARGET, TARGET)
    assert total == Counts(3 + 6, 1, 3)
    assert total.dice == pytest.approx(18 / (18 + 1 + 3))


def test_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        counts(np.zeros((4, 4)), np.zeros((4, 5)))


def square(top: int, left: int, side: int = 10, shape=(40, 40)) -> np.ndarray:
    a = np.zeros(shape, bool)
    a[top:top + side, left:left + side] = True
    return a


def test_hd95_of_a_shifted_square():
    """A 10x10 square moved 3 px right: every boundary pixel is within 3 px of the other boundary, and more
    than 5% of them (the middle of the left/right sides) are exactly 3 px away, so the 95th percentile is 3."""
    assert hd95(square(10, 10), square(10, 13)) == pytest.approx(3.0)
    assert hd95(square(10, 10), square(10, 10)) == 0.0


def test_hd95_of_points_and_lines():
    # two single pixels 7 px apart
    assert hd95(grid((2, 3), shape=(20, 20)), grid((2, 10), shape=(20, 20))) == pytest.approx(7.0)
    # a 1-px line moved 4 rows down: every pixel of each is exactly 4 px from the other
    a, b = np.zeros((20, 20), bool), np.zeros((20, 20), bool)
    a[5, 2:15], b[9, 2:15] = True, True
    assert hd95(a, b) == pytest.approx(4.0)
    # in a volume: one voxel, the other two slices further along the first axis and 2 px across
    v, w = np.zeros((4, 8, 8), bool), np.zeros((4, 8, 8), bool)
    v[0, 3, 3], w[2, 3, 5] = True, True
    assert hd95(v, w) == pytest.approx(np.sqrt(2 ** 2 + 2 ** 2))


def test_hd95_in_the_units_of_a_spacing():
    # the voxels above with slices 3 mm apart and 1 mm pixels: sqrt(6² + 2²) mm
    v, w = np.zeros((4, 8, 8), bool), np.zeros((4, 8, 8), bool)
    v[0, 3, 3], w[2, 3, 5] = True, True
    assert hd95(v, w, spacing=(3.0, 1.0, 1.0)) == pytest.approx(np.sqrt(6 ** 2 + 2 ** 2))
    assert hd95(v, w, spacing=None) == pytest.approx(np.sqrt(8))


def test_hd95_undefined_when_a_side_is_empty():
    empty = np.zeros((40, 40), bool)
    assert hd95(empty, square(1, 1)) is None
    assert hd95(square(1, 1), empty) is None
    assert hd95(empty, empty) is None


def test_detection_in_2d():
    target = np.zeros((12, 12), bool)
    target[1:3, 1:3] = True  # lesion A, found
    target[8:10, 8:10] = True  # lesion B, missed
    pred = np.zeros((12, 12), bool)
    pred[2:4, 2:4] = True  # overlaps A by one pixel
    pred[0, 11] = True  # a false positive
    pred[5, 0:2] = True  # another false positive
    d = detection(pred, target)
    assert (d.lesions, d.detected, d.false_positives) == (2, 1, 2)


def test_detection_one_component_touching_two_lesions():
    target = grid((0, 0), (0, 4), shape=(3, 6))
    pred = grid((0, 0), (0, 1), (0, 2), (0, 3), (0, 4), shape=(3, 6))
    d = detection(pred, target)
    assert (d.lesions, d.detected, d.false_positives) == (2, 2, 0)


def test_diagonal_pixels_are_one_lesion():
    d = detection(np.zeros((4, 4), bool), grid((0, 0), (1, 1), shape=(4, 4)))
    assert (d.lesions, d.detected, d.false_positives) == (1, 0, 0)


def test_detection_connects_across_slices():
    target = np.zeros((3, 8, 8), bool)
    target[0, 2, 2] = True
    target[1, 3, 3] = True  # touches the voxel above diagonally: the same lesion in 3-D
    target[2, 7, 7] = True  # far away: a second lesion
    d = detection(target, target)
    assert (d.lesions, d.detected, d.false_positives) == (2, 2, 0)
    # predicting only the part in slice 1 detects the whole 3-D lesion
    pred = np.zeros_like(target)
    pred[1, 3, 3] = True
    d = detection(pred, target)
    assert (d.lesions, d.detected, d.false_positives) == (2, 1, 0)
    # the same voxels slice by slice, in 2-D, are three lesions
    assert sum(detection(t, t).lesions for t in target) == 3


def test_detection_of_nothing():
    empty = np.zeros((2, 5, 5), bool)
    d = detection(empty, empty)
    assert (d.lesions, d.detected, d.false_positives) == (0, 0, 0)
    d = detection(grid((1, 1), shape=(5, 5)), np.zeros((5, 5), bool))
    assert (d.lesions, d.detected, d.false_positives) == (0, 0, 1)
