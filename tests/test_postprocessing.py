import numpy as np
import pytest

from brainmets.cache import Arrays
from brainmets.evaluation import report, tune_postprocessing
from brainmets.postprocessing import binarize


def test_binarize_thresholds_then_drops_small_components():
    prob = np.zeros((20, 20), np.float32)
    prob[2:8, 2:8] = 0.9  # 36 px
    prob[15:17, 15:17] = 0.8  # 4 px
    prob[10, 10] = 0.4  # under the threshold
    assert binarize(prob, 0.5).sum() == 40
    assert binarize(prob, 0.3).sum() == 41
    kept = binarize(prob, 0.5, min_area=5)
    assert kept.sum() == 36 and kept[2:8, 2:8].all()
    assert binarize(prob, 0.5, min_area=37).sum() == 0
    stack = np.stack([prob, prob])
    np.testing.assert_array_equal(binarize(stack, 0.5, 5), np.stack([kept, kept]))


def test_evaluation_uses_the_same_rule():
    truth = np.zeros((1, 20, 20), np.uint8)
    truth[0, 2:8, 2:8] = 1
    arrays = Arrays(np.zeros((1, 20, 20, 3), np.uint8), truth, ["p"], [1])
    prob = np.zeros((1, 20, 20), np.float32)
    prob[0, 2:8, 2:8] = 0.9
    prob[0, 15:17, 15:17] = 0.9  # a 4-px false positive
    assert report(arrays, ["p"], prob, 0.5)["dice_per_patient_mean"] == pytest.approx(72 / 76)
    assert report(arrays, ["p"], prob, 0.5, min_area=5)["dice_per_patient_mean"] == 1.0


def test_tuning_finds_the_setting_that_removes_false_positives():
    truth = np.zeros((2, 32, 32), np.uint8)
    truth[:, 4:14, 4:14] = 1
    arrays = Arrays(np.zeros((2, 32, 32, 3), np.uint8), truth, ["a", "b"], [1, 1])
    prob = truth.astype(np.float32) * 0.65
    prob[:, 25:30, 25:30] = 0.95  # 25-px false positives, more confident than the lesion
    tuned = tune_postprocessing(arrays, ["a", "b"], prob)
    assert tuned["dice_per_patient_mean"] == 1.0
    assert tuned["threshold"] <= 0.6 and 25 < tuned["min_lesion_px"] <= 100
    assert len(tuned["grid"]) == 42
