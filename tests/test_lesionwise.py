"""BraTS-METS lesion-wise Dice and HD95 against values worked out by hand on tiny volumes.

Every lesion below is a 2x2x2 cube (8 voxels) unless said otherwise, away from the volume's border; thin
objects are all edge, so the HD95s are plain distances. A 95th percentile of n sorted distances is read at
index 0.95 (n - 1), linearly interpolated (MONAI).

panoptica 2.1.7 (connected components, maximum bipartite matching on Dice, per-instance Dice and HD95, the
same 374 penalty), run on these cases in a throwaway environment, agrees on the perfect, missed, false,
partial, empty and one-sided cases; on the merged, split and near-miss cases it differs by design, matching
one to one: merged 0.222 / 189.5 (one lesion matched, one missed), split 0.2 / 188.5 (one part matched, the
other a false lesion), near miss 0 / 374 (no overlap, so a miss and a false lesion).
"""

from __future__ import annotations

import numpy as np
import pytest

from brainmets.lesionwise import HD95_PENALTY, METS_GROUPS, LesionWise, lesion_wise, lesion_wise_groups

SHAPE = (6, 8, 14)
A = ((2, 4), (3, 5), (2, 4))  # x 2-3
B = ((2, 4), (3, 5), (7, 9))  # x 7-8: three empty columns from A, too far to merge
FAR = ((2, 4), (3, 5), (11, 13))


def vol(*boxes, shape=SHAPE, value=1) -> np.ndarray:
    a = np.zeros(shape, np.uint8)
    for z, y, x in boxes:
        a[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = value
    return a


def scores(lw: LesionWise) -> tuple:
    return lw.dice, lw.hd95, lw.lesions_true, lw.lesions_found, lw.lesions_false


def test_the_penalty_is_brats_mets_2023s():
    assert HD95_PENALTY == 374.0


def test_perfect():
    assert scores(lesion_wise(vol(A, B), vol(A, B))) == (1.0, 0.0, 2, 2, 0)


def test_empty_and_empty_scores_one_and_zero():
    assert scores(lesion_wise(vol(), vol())) == (1.0, 0.0, 0, 0, 0)


def test_a_missed_lesion_scores_zero_and_the_penalty():
    # A found (Dice 1, HD95 0), B missed (0, 374): (1 + 0) / 2, (0 + 374) / 2
    lw = lesion_wise(vol(A), vol(A, B))
    assert scores(lw) == (0.5, 187.0, 2, 1, 0)
    assert lw.lesion_dice == (1.0, 0.0) and lw.lesion_hd95 == (0.0, 374.0)
    assert scores(lesion_wise(vol(), vol(A))) == (0.0, 374.0, 1, 0, 0)  # nothing predicted


def test_a_false_lesion_counts_in_the_denominator():
    # A found (1, 0); one false lesion (0, 374) over 1 lesion + 1 false
    assert scores(lesion_wise(vol(A, FAR), vol(A))) == (0.5, 187.0, 1, 1, 1)
    assert scores(lesion_wise(vol(A), vol())) == (0.0, 374.0, 0, 0, 1)  # nothing there, something claimed


def test_two_lesions_merged_into_one_prediction_count_for_both():
    # one predicted bar x 2-8 (2x2x7 = 28 voxels) over A and B: each lesion's match is the whole bar,
    # Dice 2*8 / (8 + 28) = 4/9. Bar -> A: 8 voxels at 0, then 4 each at 1..5; index 0.95*27 = 25.65 -> 5.
    # A -> bar: all 0. Likewise for B. No false lesion.
    lw = lesion_wise(vol(((2, 4), (3, 5), (2, 9))), vol(A, B))
    assert scores(lw) == (pytest.approx(4 / 9), pytest.approx(5.0), 2, 2, 0)


def test_a_lesion_split_in_two_predictions_is_scored_against_both():
    # lesion x 2-5 (16 voxels); predicted x 2 and x 5 (two components of 4): union 8, all inside.
    # Dice 2*8 / (16 + 8) = 2/3. Lesion -> prediction: 8 voxels at 0, 8 (x 3, 4) at 1; index 14.25 -> 1.
    lw = lesion_wise(vol(((2, 4), (3, 5), (2, 3)), ((2, 4), (3, 5), (5, 6))), vol(((2, 4), (3, 5), (2, 6))))
    assert scores(lw) == (pytest.approx(2 / 3), pytest.approx(1.0), 1, 1, 0)


def test_a_prediction_touching_the_dilated_lesion_finds_it():
    # predicted x 4-5, right beside A (x 2-3): no overlap, so Dice 0, but within the one-voxel dilation, so A
    # is found and no lesion is false. Distances 1 and 2, four each, both ways: index 6.65 -> 2.
    assert scores(lesion_wise(vol(((2, 4), (3, 5), (4, 6))), vol(A))) == (0.0, pytest.approx(2.0), 1, 1, 0)
    # one empty column between them: the dilation (x 1-4) holds none of it, a miss and a false lesion
    assert scores(lesion_wise(vol(((2, 4), (3, 5), (5, 7))), vol(A))) == (0.0, 374.0, 1, 0, 1)


def test_lesions_two_voxels_apart_are_one_lesion():
    # A (x 2-3) and a cube at x 6-7: two empty columns; dilated, x 1-4 and x 5-8 touch -> one lesion of 16
    # voxels. Predicting A alone: Dice 2*8 / (16 + 8) = 2/3. Three columns apart (A and B): two lesions.
    truth = vol(A, ((2, 4), (3, 5), (6, 8)))
    lw = lesion_wise(vol(A), truth)
    assert (lw.lesions_true, lw.lesions_found, lw.dice) == (1, 1, pytest.approx(2 / 3))
    assert lesion_wise(vol(A), truth, dilation=0).lesions_true == 2  # without dilation, two lesions


def test_partial_overlap():
    # the top half of A predicted (4 voxels): Dice 8/12; missed half at distance 1 -> HD95 1
    assert scores(lesion_wise(vol(((2, 3), (3, 5), (2, 4))), vol(A))) == (pytest.approx(2 / 3), 1.0, 1, 1, 0)


def test_lesions_of_two_voxels_or_fewer_are_left_out():
    speck = ((3, 4), (3, 4), (2, 4))  # 2 voxels
    assert scores(lesion_wise(vol(), vol(speck))) == (1.0, 0.0, 0, 0, 0)  # missed, but not scored
    assert scores(lesion_wise(vol(speck), vol(speck))) == (1.0, 0.0, 0, 0, 0)  # found: not a false lesion
    # beside a scored lesion: only A counts
    assert scores(lesion_wise(vol(A), vol(A, ((3, 4), (3, 4), (11, 13))))) == (1.0, 0.0, 1, 1, 0)
    assert lesion_wise(vol(), vol(speck), smallest=0).lesions_true == 1


def test_hd95_in_the_units_of_the_spacing():
    # the near miss above with x voxels 2 mm wide: distances 2 and 4 -> 4 mm; the penalty is unchanged
    pred, truth = vol(((2, 4), (3, 5), (4, 6))), vol(A)
    assert lesion_wise(pred, truth, spacing=(1, 1, 2)).hd95 == pytest.approx(4.0)
    assert lesion_wise(vol(), truth, spacing=(1, 1, 2)).hd95 == 374.0
    # and the smallest lesion is a volume: 2 voxels of 0.5 x 1 x 1 mm are 1 mm³, left out; of 2 x 1 x 1, 4 mm³, kept
    speck = vol(((3, 4), (3, 4), (2, 4)))
    assert lesion_wise(vol(), speck, spacing=(0.5, 1, 1)).lesions_true == 0
    assert lesion_wise(vol(), speck, spacing=(2, 1, 1)).lesions_true == 1


def test_a_slice_works_too():
    pred, truth = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    truth[1:3, 1:3] = truth[7:9, 7:9] = True  # dilated (8-connected): rows 0-3 and 6-9, apart
    pred[1:3, 1:3] = True
    assert scores(lesion_wise(pred, truth)) == (0.5, 187.0, 2, 1, 0)


def test_cropping_does_not_change_the_answer_at_the_border():
    # lesions on the volume's faces: the crop keeps them and their dilations exactly
    truth = np.zeros((5, 9, 9), bool)
    truth[0:2, 0:3, 0:3] = truth[3:5, 6:9, 6:9] = True
    pred = np.zeros_like(truth)
    pred[0:2, 0:3, 1:4] = True
    lw = lesion_wise(pred, truth)
    # first lesion 18 voxels, prediction 18, 12 shared: Dice 24/36; second missed
    assert (lw.lesions_true, lw.lesions_found, lw.lesions_false) == (2, 1, 0)
    assert lw.dice == pytest.approx((2 / 3 + 0) / 2)


def test_label_groups_of_brats_mets():
    # X: label 3 (enhancing) at its centre inside label 2 (oedema), Y: oedema only. The prediction draws all of
    # X as oedema and misses Y. Whole tumour {1,2,3}: X found exactly (1, 0), Y missed (0, 374). Tumour core
    # {1,3} and enhancing {3}: the core (a 2x2x2 cube, 8 voxels) is missed and nothing is predicted.
    x = ((1, 5), (2, 6), (1, 5))
    y = ((1, 3), (2, 4), (9, 11))
    truth = vol(x, y, shape=SHAPE, value=2)
    truth[2:4, 3:5, 2:4] = 3
    pred = vol(x, value=2)
    out = lesion_wise_groups(pred, truth, METS_GROUPS)
    assert list(out) == ["whole tumour", "tumour core", "enhancing tumour"]
    assert scores(out["whole tumour"]) == (0.5, 187.0, 2, 1, 0)
    assert scores(out["tumour core"]) == scores(out["enhancing tumour"]) == (0.0, 374.0, 1, 0, 0)
    # a binary mask is one group, the whole lesion
    assert scores(lesion_wise_groups(pred > 0, truth > 0)["whole lesion"]) == (0.5, 187.0, 2, 1, 0)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        lesion_wise(np.zeros((4, 4)), np.zeros((4, 5)))
