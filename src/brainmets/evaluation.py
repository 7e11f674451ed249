"""Run a model over whole preprocessed slices and report the metrics of the field, per patient first.

The headline, as in Buda et al. (2019) on this dataset, is the mean per-patient Dice: each patient's
slices stacked into a volume and scored in 3-D. Also reported: Dice over the slices that hold a lesion
(2-D), pooled counts over every pixel, HD95 and lesion-wise detection. Empty cases: see metrics.py.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from torch import nn

from brainmets.cache import Arrays
from brainmets.metrics import Counts, counts, detection, hd95
from brainmets.models import autocast
from brainmets.postprocessing import binarize
from brainmets.preprocessing import normalize


@torch.no_grad()
def predict_probabilities(model: nn.Module, images: np.ndarray, batch_size: int = 16, bf16: bool = False,
                          progress: bool = False) -> np.ndarray:
    """Sigmoid probabilities float32 (N, S, S) for enhanced uint8 slices (N, S, S, 3)."""
    model.eval()
    device = next(model.parameters()).device
    out = np.empty(images.shape[:3], np.float32)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("predicting", total=len(images))
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(normalize(np.asarray(images[start:start + batch_size]))).to(device)
            with autocast(bf16, device.type):
                logits = model(x)
            out[start:start + len(x)] = torch.sigmoid(logits.float())[:, 0].cpu().numpy()
            bar.advance(task, len(x))
    return out


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def report(arrays: Arrays, patients: list[str], probabilities: np.ndarray, threshold: float,
           min_area: float = 0) -> dict[str, Any]:
    """Every metric of the evaluation report; `probabilities` rows follow `patients`' rows in order.

    Masks are made by `postprocessing.binarize(probability, threshold, min_area)`, as in serving."""
    per_patient, slice_dices, pooled = [], [], Counts(0, 0, 0)
    lesions = detected = false_positives = 0
    offset = 0
    for patient in patients:
        rows = arrays.rows(patient)
        target = np.asarray(arrays.masks[rows.start:rows.stop]).astype(bool)
        pred = binarize(probabilities[offset:offset + len(rows)], threshold, min_area)
        offset += len(rows)
        c = counts(pred, target)
        pooled += c
        det = detection(pred, target)
        lesions, detected, false_positives = (lesions + det.lesions, detected + det.detected,
                                              false_positives + det.false_positives)
        slice_dices += [counts(p, t).dice for p, t in zip(pred, target) if t.any()]
        per_patient.append({"id": patient, "slices": len(rows), "lesion_slices": int(target.any(axis=(1, 2)).sum()),
                            "dice": c.dice, "iou": c.iou, "hd95_px": hd95(pred, target),
                            "lesions": det.lesions, "detected": det.detected, "false_positives": det.false_positives})
    if offset != len(probabilities):
        raise ValueError(f"{len(probabilities)} probability maps for {offset} slices")
    dices = [p["dice"] for p in per_patient]
    return {
        "patients": len(patients),
        "slices": offset,
        "threshold": threshold,
        "min_lesion_px": min_area,
        "dice_per_patient_mean": statistics.fmean(dices),
        "dice_per_patient_median": statistics.median(dices),
        "dice_per_patient_std": statistics.pstdev(dices),
        "dice_lesion_slices_mean": _mean(slice_dices),
        "lesion_slices": len(slice_dices),
        "dice_pooled": pooled.dice,
        "iou_pooled": pooled.iou,
        "precision_pooled": pooled.precision,
        "recall_pooled": pooled.recall,
        "hd95_px_mean": _mean([p["hd95_px"] for p in per_patient]),
        "lesion_sensitivity": detected / lesions if lesions else None,
        "lesion_fp_per_patient": false_positives / len(patients),
        "per_patient": per_patient,
    }


def predict_patients(model: nn.Module, arrays: Arrays, patients: list[str], bf16: bool = False,
                     batch_size: int = 16, progress: bool = False) -> np.ndarray:
    """Probabilities of every slice of the patients, in their order: the rows `report` expects."""
    rows = [i for p in patients for i in arrays.rows(p)]
    return predict_probabilities(model, arrays.images[rows] if rows else arrays.images[:0], batch_size, bf16,
                                 progress)


def evaluate(model: nn.Module, arrays: Arrays, patients: list[str], threshold: float, bf16: bool = False,
             batch_size: int = 16, progress: bool = False, min_area: float = 0) -> dict[str, Any]:
    probs = predict_patients(model, arrays, patients, bf16, batch_size, progress)
    return report(arrays, patients, probs, threshold, min_area)


THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
MIN_AREAS = (0, 10, 25, 50, 100, 200, 400)


def tune_postprocessing(arrays: Arrays, patients: list[str], probabilities: np.ndarray) -> dict[str, Any]:
    """The threshold and smallest-lesion area that maximise mean per-patient Dice on these (validation)
    patients. Ties go to the plainer setting (0.5, then the smaller area)."""
    truths = [np.asarray(arrays.masks[r.start:r.stop]).astype(bool) for r in map(arrays.rows, patients)]
    bounds = np.cumsum([0] + [len(t) for t in truths])
    grid = []
    for threshold in THRESHOLDS:
        for area in MIN_AREAS:
            masks = binarize(probabilities, threshold, area)
            dice = statistics.fmean(counts(masks[a:b], t).dice for a, b, t in zip(bounds, bounds[1:], truths))
            grid.append({"threshold": threshold, "min_lesion_px": area, "dice_per_patient_mean": dice})
    best = max(grid, key=lambda g: (round(g["dice_per_patient_mean"], 6), -abs(g["threshold"] - 0.5),
                                    -g["min_lesion_px"]))
    return {**best, "grid": grid}
