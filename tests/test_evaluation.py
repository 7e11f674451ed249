"""The evaluation report, checked against values worked out by hand, with probabilities fed in directly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from brainmets.cache import Arrays
from brainmets.config import PostprocessConfig, PreprocessConfig, TrainConfig
from brainmets.evaluation import evaluate, flair_only, predict_probabilities, report, validate
from brainmets.inference import Network, Predictor

KEYS = {"patients", "slices", "postprocess", "dice_per_patient_min", "empty_predictions", "dice_per_patient_mean", "dice_per_patient_median", "dice_lesion_slices_mean",
        "dice_pooled", "iou_pooled", "precision_pooled", "recall_pooled", "hd95_px_mean", "lesion_sensitivity",
        "lesion_fp_per_patient", "per_patient", "lesion_wise_dice_mean", "lesion_wise_hd95_mean",
        "lesion_wise_hd95_penalty", "lesion_wise_hd95_unit", "lesion_wise_target", "lesion_wise_rules"}
PER_PATIENT_KEYS = {"id", "slices", "dice", "hd95_px", "predicted_px", "lesion_wise_dice", "lesion_wise_hd95",
                    "lesions_true", "lesions_found", "lesions_false"}
HALF = PostprocessConfig(0.5)


def case() -> tuple[Arrays, np.ndarray]:
    """Three patients of 8x8 slices, ground truth and a known imperfect prediction.

    A (3 slices): a 2x2 lesion on slices 1 and 2 (one 3-D lesion, 8 voxels); predicted whole on slice 1, top
       row only on slice 2 -> tp 6, fn 2. Missed voxels are 1 px from the prediction: HD95 1.
    B (2 slices): no lesion; one predicted pixel -> fp 1, Dice 0, HD95 undefined.
    C (2 slices): two 1-px lesions 5 px apart on slice 0; only the first predicted -> tp 1, fn 1.
       Distances target->prediction are [0, 5], whose 95th percentile is 0.95 * 5 = 4.75.
    Lesion-wise (BraTS-METS): A's lesion found, Dice 6/7, HD95 1; B one false lesion, Dice 0, HD95 374; C's
    lesions are of 1 voxel, left out, and its prediction touches one, so is not false: Dice 1, HD95 0.
    """
    masks = np.zeros((7, 8, 8), np.uint8)
    pred = np.zeros((7, 8, 8), bool)
    masks[1:3, 2:4, 2:4] = 1
    pred[1, 2:4, 2:4] = True
    pred[2, 2, 2:4] = True
    pred[3 + 0, 6, 6] = True  # B
    masks[5, 2, 2] = masks[5, 2, 7] = 1  # C
    pred[5, 2, 2] = True
    arrays = Arrays(images=np.zeros((7, 8, 8, 3), np.uint8), masks=masks,
                    patients=["A"] * 3 + ["B"] * 2 + ["C"] * 2, numbers=[1, 2, 3, 1, 2, 1, 2])
    return arrays, np.where(pred, 0.9, 0.1).astype(np.float32)


def test_every_key_of_the_report():
    arrays, probs = case()
    r = report(arrays, ["A", "B", "C"], probs, HALF)
    assert KEYS <= set(r)
    assert len(r["per_patient"]) == 3
    assert all(PER_PATIENT_KEYS <= set(p) for p in r["per_patient"])


def test_perfect_prediction():
    arrays, _ = case()
    r = report(arrays, ["A", "B", "C"], arrays.masks.astype(np.float32), HALF)
    assert (r["patients"], r["slices"]) == (3, 7)
    for key in ("dice_per_patient_mean", "dice_per_patient_median", "dice_lesion_slices_mean", "dice_pooled",
                "iou_pooled", "precision_pooled", "recall_pooled", "lesion_sensitivity"):
        assert r[key] == 1.0, key
    assert r["hd95_px_mean"] == 0.0 and r["lesion_fp_per_patient"] == 0.0
    assert [p["dice"] for p in r["per_patient"]] == [1.0, 1.0, 1.0]  # B: nothing there, nothing claimed
    assert [p["hd95_px"] for p in r["per_patient"]] == [0.0, None, 0.0]
    assert (r["lesion_wise_dice_mean"], r["lesion_wise_hd95_mean"]) == (1.0, 0.0)
    assert [(p["lesions_true"], p["lesions_found"], p["lesions_false"]) for p in r["per_patient"]] == [
        (1, 1, 0), (0, 0, 0), (0, 0, 0)]  # C's 1-voxel lesions are left out, as BraTS-METS leaves out <= 2 mm³


def test_known_imperfect_prediction():
    arrays, probs = case()
    r = report(arrays, ["A", "B", "C"], probs, HALF)
    dice_a, dice_b, dice_c = 2 * 6 / (12 + 2), 0.0, 2 * 1 / (2 + 1)
    assert (r["patients"], r["slices"]) == (3, 7)
    assert r["dice_per_patient_mean"] == pytest.approx((dice_a + dice_b + dice_c) / 3)
    assert r["dice_per_patient_median"] == pytest.approx(dice_c)
    # lesion slices: A1 perfect, A2 tp 2 fn 2, C0 tp 1 fn 1
    assert r["dice_lesion_slices_mean"] == pytest.approx((1 + 4 / 6 + 2 / 3) / 3)
    # pooled over every pixel: tp 7, fp 1, fn 3
    assert r["dice_pooled"] == pytest.approx(14 / 18)
    assert r["iou_pooled"] == pytest.approx(7 / 11)
    assert r["precision_pooled"] == pytest.approx(7 / 8)
    assert r["recall_pooled"] == pytest.approx(7 / 10)
    assert r["hd95_px_mean"] == pytest.approx((1.0 + 4.75) / 2)  # B has none and is skipped
    assert r["lesion_sensitivity"] == pytest.approx(2 / 3)  # A's lesion and C's first; C's second missed
    assert r["lesion_fp_per_patient"] == pytest.approx(1 / 3)
    a, b, c = r["per_patient"]
    assert (a["id"], a["slices"], a["dice"], a["hd95_px"]) == ("A", 3, pytest.approx(dice_a), pytest.approx(1.0))
    assert (b["id"], b["slices"], b["dice"], b["hd95_px"]) == ("B", 2, 0.0, None)
    assert (c["id"], c["slices"], c["dice"], c["hd95_px"]) == ("C", 2, pytest.approx(dice_c), pytest.approx(4.75))
    assert (a["lesions"], a["detected"], b["false_positives"], c["lesions"], c["detected"]) == (1, 1, 1, 2, 1)
    assert (a["lesion_slices"], b["lesion_slices"], c["lesion_slices"]) == (2, 0, 1)
    assert (a["true_px"], a["predicted_px"], a["precision"], a["recall"]) == (8, 6, 1.0, 6 / 8)
    assert (b["true_px"], b["precision"], b["recall"]) == (0, 0.0, None)  # one pixel claimed, none there


def test_lesion_wise_scores_by_hand():
    arrays, probs = case()
    r = report(arrays, ["A", "B", "C"], probs, HALF)
    a, b, c = r["per_patient"]
    assert (a["lesion_wise_dice"], a["lesion_wise_hd95"]) == (pytest.approx(6 / 7), pytest.approx(1.0))
    assert (b["lesion_wise_dice"], b["lesion_wise_hd95"]) == (0.0, 374.0)  # one false lesion
    assert (c["lesion_wise_dice"], c["lesion_wise_hd95"]) == (1.0, 0.0)  # nothing scored
    assert [(p["lesions_true"], p["lesions_found"], p["lesions_false"]) for p in (a, b, c)] == [
        (1, 1, 0), (0, 0, 1), (0, 0, 0)]
    assert r["lesion_wise_dice_mean"] == pytest.approx((6 / 7 + 0 + 1) / 3)
    assert r["lesion_wise_hd95_mean"] == pytest.approx((1 + 374 + 0) / 3)
    assert (r["lesion_wise_hd95_penalty"], r["lesion_wise_hd95_unit"], r["lesion_wise_target"]) == (
        374.0, "px", "whole lesion")
    assert "BraTS-METS 2023" in r["lesion_wise_rules"] and "374" in r["lesion_wise_rules"]


def test_threshold_is_applied():
    arrays, probs = case()
    assert report(arrays, ["A", "B", "C"], probs, PostprocessConfig(0.95))["dice_pooled"] == 0.0  # nothing predicted
    r = report(arrays, ["A", "B", "C"], probs, PostprocessConfig(0.05))  # everything predicted
    assert r["recall_pooled"] == 1.0 and r["precision_pooled"] == pytest.approx(10 / (7 * 64))


def test_patients_in_any_order_and_subset():
    arrays, probs = case()
    rows = list(arrays.rows("C")) + list(arrays.rows("A"))
    r = report(arrays, ["C", "A"], probs[rows], HALF)
    assert [p["id"] for p in r["per_patient"]] == ["C", "A"]
    assert r["slices"] == 5 and r["lesion_fp_per_patient"] == 0.0
    assert r["dice_pooled"] == pytest.approx(2 * 7 / (2 * 7 + 0 + 3))


def test_too_few_or_too_many_probability_maps():
    arrays, probs = case()
    with pytest.raises(ValueError, match="probability maps"):
        report(arrays, ["A", "B"], probs, HALF)


def test_no_lesion_anywhere_leaves_lesion_metrics_undefined():
    arrays, probs = case()
    r = report(arrays, ["B"], probs[arrays.rows("B").start:arrays.rows("B").stop], HALF)
    assert r["lesion_sensitivity"] is None and r["dice_lesion_slices_mean"] is None
    assert r["hd95_px_mean"] is None and r["recall_pooled"] is None and r["precision_pooled"] == 0.0


class MaskOracle(torch.nn.Module):
    """A 'model' whose logit is high exactly where channel 0 is bright, to test the plumbing around report."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(40.0))

    def forward(self, x):
        return (x[:, :1] - 0.5) * self.scale


def oracle_arrays() -> Arrays:
    arrays, _ = case()
    images = np.zeros((7, 16, 16, 3), np.uint8)
    masks = np.zeros((7, 16, 16), np.uint8)
    masks[:, :8, :8] = arrays.masks
    images[..., 0] = masks * 255
    images[6, 10, 10, 0] = 255  # a bright pixel the truth does not hold: one false positive in C
    return Arrays(images=images, masks=masks, patients=arrays.patients, numbers=arrays.numbers)


def check_oracle_report(r: dict) -> None:
    assert r["patients"] == 2 and r["slices"] == 5
    assert [p["dice"] for p in r["per_patient"]] == [pytest.approx(2 * 2 / (3 + 2)), 1.0]
    assert r["lesion_fp_per_patient"] == 0.5
    assert math.isclose(r["dice_per_patient_mean"], (0.8 + 1) / 2)


def test_validate_runs_the_torch_model_over_the_patients_rows():
    bigger = oracle_arrays()
    probs = predict_probabilities(MaskOracle(), bigger.images, batch_size=3)
    assert probs.shape == (7, 16, 16) and probs.dtype == np.float32
    assert ((probs > 0.5) == (bigger.images[..., 0] > 127)).all()
    check_oracle_report(validate(MaskOracle(), bigger, ["C", "A"], HALF))


def oracle_predictor(post: PostprocessConfig = HALF) -> Predictor:
    cfg = TrainConfig(preprocess=PreprocessConfig(image_size=16), crop_size=None).with_post(post)
    oracle = MaskOracle()
    net = Network(cfg, None, lambda x: oracle(torch.from_numpy(x)).detach().numpy(), "torch")
    return Predictor([net], "oracle")


def test_evaluate_goes_through_the_engine_with_its_post_processing():
    check_oracle_report(evaluate(oracle_predictor(), oracle_arrays(), ["C", "A"]))
    # single mode keeps one 3-D lesion per patient: C's three 1-px components are equally strong, and the first
    # in scan order, a true one, stays
    single = evaluate(oracle_predictor(PostprocessConfig(0.5, mode="single")), oracle_arrays(), ["C"])
    assert single["lesion_fp_per_patient"] == 0.0 and single["per_patient"][0]["predicted_px"] == 1


def test_flair_only_puts_flair_in_every_channel():
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    out = flair_only(images)
    assert out.shape == images.shape
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], images[..., 1])
