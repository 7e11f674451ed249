import numpy as np
import pytest

from brainmets.cache import Arrays
from brainmets.config import PostprocessConfig
from brainmets.evaluation import report, tune_postprocessing
from brainmets.postprocessing import binarize, mask_slice, mask_stack


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
    # the slice rule scales its area with the input: at 4x the model's pixels, 5 px mean 20
    assert mask_slice(prob, PostprocessConfig(0.5, min_lesion_px=5), scale=4).sum() == 36


def two_lesion_stack() -> np.ndarray:
    """4 slices of 20x20: a big faint lesion across slices 0-2 (3 x 36 voxels at 0.6) and a small confident one
    on slice 3 (4 voxels at 0.95); they touch only diagonally across slices 2 and 3 at one corner."""
    prob = np.zeros((4, 20, 20), np.float32)
    prob[0:3, 2:8, 2:8] = 0.6
    prob[3, 8:10, 8:10] = 0.95
    return prob


def test_stack_rule_is_3d_with_26_connectivity():
    prob = two_lesion_stack()
    # (2, 7, 7) and (3, 8, 8) are corner neighbours in 3-D: one component of 112 voxels
    assert mask_stack(prob, PostprocessConfig(0.5, min_lesion_voxels=110)).sum() == 112
    prob[3] = np.roll(prob[3], 2, axis=1)  # now apart
    assert mask_stack(prob, PostprocessConfig(0.5, min_lesion_voxels=5)).sum() == 108
    assert mask_stack(prob, PostprocessConfig(0.5)).sum() == 112  # multiple mode keeps both
    # single mode keeps the largest summed probability (108 x 0.6 > 4 x 0.95), not the most confident pixel
    single = mask_stack(prob, PostprocessConfig(0.5, mode="single"))
    assert single.sum() == 108 and not single[3].any()
    assert mask_stack(prob, PostprocessConfig(0.7)).sum() == 4
    assert not mask_stack(prob, PostprocessConfig(0.99, mode="single")).any()  # nothing above: empty
    # sizes scale with the input's area: at 2x the model's pixels, 60 voxels mean 120
    assert mask_stack(prob, PostprocessConfig(0.5, min_lesion_voxels=60), scale=2).sum() == 0


def test_stack_rule_refuses_a_lone_slice_and_bad_settings():
    with pytest.raises(ValueError, match="stack"):
        mask_stack(np.zeros((20, 20), np.float32), PostprocessConfig())
    with pytest.raises(ValueError, match="lesion mode"):
        PostprocessConfig(mode="some")
    with pytest.raises(ValueError, match="threshold"):
        PostprocessConfig(threshold=1.0)


def test_evaluation_uses_the_same_rule():
    truth = np.zeros((1, 20, 20), np.uint8)
    truth[0, 2:8, 2:8] = 1
    arrays = Arrays(np.zeros((1, 20, 20, 3), np.uint8), truth, ["p"], [1])
    prob = np.zeros((1, 20, 20), np.float32)
    prob[0, 2:8, 2:8] = 0.9
    prob[0, 15:17, 15:17] = 0.9  # a 4-px false positive
    assert report(arrays, ["p"], prob, PostprocessConfig(0.5))["dice_per_patient_mean"] == pytest.approx(72 / 76)
    assert report(arrays, ["p"], prob, PostprocessConfig(0.5, min_lesion_voxels=5))["dice_per_patient_mean"] == 1.0
    assert report(arrays, ["p"], prob, PostprocessConfig(0.5, mode="single"))["dice_per_patient_mean"] == 1.0


def test_tuning_finds_the_setting_that_removes_false_positives_on_a_plateau():
    truth = np.zeros((2, 32, 32), np.uint8)
    truth[:, 4:14, 4:14] = 1
    arrays = Arrays(np.zeros((2, 32, 32, 3), np.uint8), truth, ["a", "b"], [1, 1])
    prob = truth.astype(np.float32) * 0.65
    prob[:, 25:30, 25:30] = 0.95  # 25-px false positives, more confident than the lesion
    tuned = tune_postprocessing(arrays, ["a", "b"], prob)
    multiple = tuned["modes"]["multiple"]
    assert multiple["dice_per_patient_mean"] == 1.0
    # the lesion (200 voxels per patient) outweighs the false positive (50) in summed probability
    assert tuned["modes"]["single"]["dice_per_patient_mean"] == 1.0
    post = PostprocessConfig(**tuned["post"])
    assert post.threshold <= 0.6 and report(arrays, ["a", "b"], prob, post)["dice_per_patient_mean"] == 1.0
    assert 25 < multiple["post"]["min_lesion_voxels"] + 25 * (post.mode == "single") or post.mode == "single"
    # lone slices: the 2-D rule drops the 25-px false positive
    assert 25 < post.min_lesion_px <= 100
    assert len(tuned["grid"]) == 14 * 2 * 5 and all("plateau_dice" in g for g in tuned["grid"])


def test_a_spike_loses_to_a_plateau():
    """A threshold that wins alone, between two poor ones, is not chosen over a broad fair range."""
    truth = np.zeros((1, 32, 32), np.uint8)
    truth[0, 2:10, 2:10] = 1
    arrays = Arrays(np.zeros((1, 32, 32, 3), np.uint8), truth, ["p"], [1])
    prob = np.zeros((1, 32, 32), np.float32)
    prob[0, 2:6, 2:10] = 0.8  # half the lesion, found up to 0.8
    prob[0, 6:10, 2:10] = 0.52  # the other half, found at 0.5 and below
    prob[0, 12:32, 12:27] = 0.47  # a 300-px false positive, found at 0.45 and below
    tuned = tune_postprocessing(arrays, ["p"], prob)
    at = {g["threshold"]: g["dice_per_patient_mean"] for g in tuned["grid"]
          if g["mode"] == "multiple" and g["min_lesion_voxels"] == 0}
    assert at[0.5] == 1.0 and at[0.45] < 0.35 and at[0.6] == pytest.approx(2 / 3)  # 0.5 is a spike
    assert tuned["modes"]["multiple"]["post"]["threshold"] > 0.5
