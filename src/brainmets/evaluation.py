"""Score patients with the metrics of the field, per patient first, through the serving engine.

The headline, as in Buda et al. (2019) on this dataset, is the mean per-patient Dice: each patient's
slices stacked into a volume and scored in 3-D. Also reported: Dice over the slices that hold a lesion
(2-D), pooled counts over every pixel, HD95, lesion-wise detection, and the BraTS-METS lesion-wise Dice and
HD95 (lesionwise.py) of the whole lesion. Empty cases: see metrics.py and lesionwise.py.

`evaluate` runs the inference engine (`brainmets.inference.Predictor`: same runtime, precision, threshold
and post-processing as the API) on the cached preprocessed slices, so a model card describes what is served.
Training's own per-epoch validation (`validate`) runs the PyTorch model it is training.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from torch import nn

from brainmets import lesionwise
from brainmets.cache import Arrays
from brainmets.config import LESION_MODES, PostprocessConfig
from brainmets.metrics import Counts, counts, detection, hd95
from brainmets.models import autocast
from brainmets.postprocessing import binarize, components, keep_components, mask_stack
from brainmets.preprocessing import normalize


def patient_rows(arrays: Arrays, patients: list[str]) -> list[int]:
    return [i for p in patients for i in arrays.rows(p)]


def flair_only(images: np.ndarray) -> np.ndarray:
    """Enhanced (N, S, S, 3) slices with FLAIR standing in for both T1 channels: a study with FLAIR alone, as
    the dataset fills a missing sequence. CLAHE works per channel, so this equals preprocessing such a study."""
    return np.repeat(np.asarray(images)[..., 1:2], 3, axis=-1)


def engine_probabilities(predictor, arrays: Arrays, patients: list[str], tta: bool = False,
                         flair: bool = False, progress: bool = False, chunk: int = 64) -> np.ndarray:
    """The engine's probabilities float32 (N, S, S) for every slice of the patients, in their order."""
    rows = patient_rows(arrays, patients)
    out = np.empty((len(rows), *arrays.images.shape[1:3]), np.float32)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"{predictor.name}: predicting", total=len(rows))
        for start in range(0, len(rows), chunk):
            images = arrays.images[rows[start:start + chunk]]
            x = normalize(flair_only(images) if flair else np.asarray(images))
            out[start:start + len(x)] = predictor.model_probabilities(x, tta)
            bar.advance(task, len(x))
    return out


def evaluate(predictor, arrays: Arrays, patients: list[str], tta: bool = False, flair: bool = False,
             progress: bool = False) -> dict[str, Any]:
    """The report of `predictor` (its own post-processing) on these patients."""
    probs = engine_probabilities(predictor, arrays, patients, tta, flair, progress)
    return report(arrays, patients, probs, predictor.post)


@torch.no_grad()
def predict_probabilities(model: nn.Module, images: np.ndarray, batch_size: int = 16, bf16: bool = False) -> np.ndarray:
    """PyTorch sigmoid probabilities float32 (N, S, S) for enhanced uint8 slices (N, S, S, 3)."""
    model.eval()
    device = next(model.parameters()).device
    out = np.empty(images.shape[:3], np.float32)
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(normalize(np.asarray(images[start:start + batch_size]))).to(device)
        with autocast(bf16, device.type):
            logits = model(x)
        out[start:start + len(x)] = torch.sigmoid(logits.float())[:, 0].cpu().numpy()
    return out


def validate(model: nn.Module, arrays: Arrays, patients: list[str], post: PostprocessConfig,
             bf16: bool = False) -> dict[str, Any]:
    """Training's per-epoch validation report, with the PyTorch model being trained."""
    rows = patient_rows(arrays, patients)
    images = arrays.images[rows] if rows else arrays.images[:0]
    return report(arrays, patients, predict_probabilities(model, images, bf16=bf16), post)


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def _truths(arrays: Arrays, patients: list[str]) -> list[np.ndarray]:
    return [np.asarray(arrays.masks[r.start:r.stop]).astype(bool) for r in map(arrays.rows, patients)]


LESION_WISE_RULES = (
    "BraTS-METS 2023 lesion-wise rules (brainmets.lesionwise): 26-connected lesions; ground-truth lesions "
    f"dilated {lesionwise.DILATION} voxel (18-connected) to merge close ones and to match the predicted "
    "components overlapping the dilation; per lesion Dice and HD95 against the union of its match; a missed or a false lesion scores "
    f"Dice 0 and HD95 {lesionwise.HD95_PENALTY:g} (the BraTS-METS 2023 penalty, in mm there); ground-truth "
    f"lesions of {lesionwise.SMALLEST} voxels or fewer left out; a case with no lesion and nothing predicted "
    "scores Dice 1 and HD95 0. Scored on the whole lesion (every non-zero label: the masks are binary). HD95 is "
    "MONAI's, as hd95_px, in voxels: the data carries no spacing, so the penalty is applied as "
    f"{lesionwise.HD95_PENALTY:g} voxels (at 256 px over a ~24 cm field a pixel is ~1 mm in-plane; slices are "
    "thicker).")


def _lesion_wise_row(pred: np.ndarray, target: np.ndarray) -> dict[str, Any]:
    lw = lesionwise.lesion_wise_groups(pred, target, lesionwise.WHOLE_LESION)["whole lesion"]
    return {"lesion_wise_dice": lw.dice, "lesion_wise_hd95": lw.hd95, "lesions_true": lw.lesions_true,
            "lesions_found": lw.lesions_found, "lesions_false": lw.lesions_false}


def report(arrays: Arrays, patients: list[str], probabilities: np.ndarray, post: PostprocessConfig) -> dict[str, Any]:
    """Every metric of the evaluation report; `probabilities` rows follow `patients`' rows in order. Each
    patient's masks come from `postprocessing.mask_stack`, the engine's rule for a patient's stack."""
    per_patient, slice_dices, pooled = [], [], Counts(0, 0, 0)
    lesions = detected = false_positives = 0
    offset = 0
    for patient, target in zip(patients, _truths(arrays, patients)):
        pred = mask_stack(probabilities[offset:offset + len(target)], post)
        offset += len(target)
        c = counts(pred, target)
        pooled += c
        det = detection(pred, target)
        lesions, detected, false_positives = (lesions + det.lesions, detected + det.detected,
                                              false_positives + det.false_positives)
        slice_dices += [counts(p, t).dice for p, t in zip(pred, target) if t.any()]
        per_patient.append({"id": patient, "slices": len(target), "lesion_slices": int(target.any(axis=(1, 2)).sum()),
                            "dice": c.dice, "iou": c.iou, "hd95_px": hd95(pred, target), "predicted_px": int(pred.sum()),
                            "true_px": int(target.sum()), "precision": c.precision, "recall": c.recall,
                            "lesions": det.lesions, "detected": det.detected, "false_positives": det.false_positives,
                            **_lesion_wise_row(pred, target)})
    if offset != len(probabilities):
        raise ValueError(f"{len(probabilities)} probability maps for {offset} slices")
    dices = [p["dice"] for p in per_patient]
    return {
        "patients": len(patients),
        "slices": offset,
        "postprocess": dataclasses.asdict(post),
        "dice_per_patient_mean": statistics.fmean(dices),
        "dice_per_patient_median": statistics.median(dices),
        "dice_per_patient_std": statistics.pstdev(dices),
        "dice_per_patient_min": min(dices),
        "empty_predictions": sum(1 for p in per_patient if p["predicted_px"] == 0 and p["lesion_slices"]),
        "dice_lesion_slices_mean": _mean(slice_dices),
        "lesion_slices": len(slice_dices),
        "dice_pooled": pooled.dice,
        "iou_pooled": pooled.iou,
        "precision_pooled": pooled.precision,
        "recall_pooled": pooled.recall,
        "hd95_px_mean": _mean([p["hd95_px"] for p in per_patient]),
        "lesion_sensitivity": detected / lesions if lesions else None,
        "lesion_fp_per_patient": false_positives / len(patients),
        "lesion_wise_dice_mean": statistics.fmean(p["lesion_wise_dice"] for p in per_patient),
        "lesion_wise_hd95_mean": statistics.fmean(p["lesion_wise_hd95"] for p in per_patient),
        "lesion_wise_hd95_penalty": lesionwise.HD95_PENALTY,
        "lesion_wise_hd95_unit": "px",
        "lesion_wise_target": "whole lesion",
        "lesion_wise_rules": LESION_WISE_RULES,
        "per_patient": per_patient,
    }


THRESHOLDS = tuple(round(float(t), 2) for t in np.arange(0.2, 0.851, 0.05))
MIN_VOXELS = (0, 50, 200, 500, 1000)  # at 256², a 1,000-voxel lesion is ~4 slices of an 18-px disc
MIN_AREAS = (0, 10, 25, 50, 100, 200)


def tune_postprocessing(arrays: Arrays, patients: list[str], probabilities: np.ndarray) -> dict[str, Any]:
    """Per lesion mode, the threshold and smallest 3-D lesion that maximise mean per-patient Dice on these
    (validation) patients; then the 2-D rule's smallest area for lone slices at that threshold.

    A threshold is chosen on a plateau, not a spike: each is scored by the mean Dice of itself and its two
    neighbours on the grid. Ties go to the plainer setting (nearer 0.5, then the smaller size)."""
    truths = _truths(arrays, patients)
    bounds = np.cumsum([0] + [len(t) for t in truths])
    stacks = [probabilities[a:b] for a, b in zip(bounds, bounds[1:])]
    grid = []
    for threshold in THRESHOLDS:
        labelled = [components(p >= threshold) for p in stacks]
        for mode in LESION_MODES:
            for voxels in MIN_VOXELS:
                dice = statistics.fmean(counts(keep_components(p, labels, n, mode, voxels), t).dice
                                        for p, (labels, n), t in zip(stacks, labelled, truths))
                grid.append({"threshold": threshold, "mode": mode, "min_lesion_voxels": voxels,
                             "dice_per_patient_mean": dice})
    for g in grid:
        near = [h["dice_per_patient_mean"] for h in grid if h["mode"] == g["mode"]
                and h["min_lesion_voxels"] == g["min_lesion_voxels"] and abs(h["threshold"] - g["threshold"]) < 0.051]
        g["plateau_dice"] = statistics.fmean(near)
    modes = {}
    for mode in LESION_MODES:
        best = max((g for g in grid if g["mode"] == mode),
                   key=lambda g: (round(g["plateau_dice"], 6), -abs(g["threshold"] - 0.5), -g["min_lesion_voxels"]))
        area = _tune_min_area(stacks, truths, best["threshold"])
        modes[mode] = {"post": dataclasses.asdict(PostprocessConfig(best["threshold"], area, mode, best["min_lesion_voxels"])),
                       "dice_per_patient_mean": best["dice_per_patient_mean"], "plateau_dice": best["plateau_dice"]}
    chosen = max(LESION_MODES, key=lambda m: (round(modes[m]["dice_per_patient_mean"], 6), m == "multiple"))
    return {"post": modes[chosen]["post"], "mode": chosen, "modes": modes, "grid": grid}


def _tune_min_area(stacks: list[np.ndarray], truths: list[np.ndarray], threshold: float) -> int:
    """The 2-D rule, slices taken alone: the smallest-area filter that scores best at this threshold."""
    def score(area: int) -> float:
        return statistics.fmean(counts(binarize(p, threshold, area), t).dice for p, t in zip(stacks, truths))

    return max(MIN_AREAS, key=lambda a: (round(score(a), 6), -a))
