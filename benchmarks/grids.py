"""Studies on several grids against the same patients' aligned studies, on the validation patients of the
shipped split: what geometry and registration keep of the mask.

    python benchmarks/grids.py [--model best] [--patients N]

Each patient's slices become an aligned three-series DICOM study (tests/dicom_studies.py: every series on one
grid, one frame of reference, as the dataset was co-registered) and a three-grid one (FLAIR axial as acquired,
pre-contrast T1 oblique axial, post-contrast T1 3-D sagittal; `regridded_study`), the latter also with a rigid
motion of each T1 that no tag records (3 degrees and 2.5 mm, 4 degrees and 3 mm). Every study goes through the
study reader and the engine; each mask is scored against the patient's ground truth (3-D Dice) and against
the aligned study's mask. Rows:

    aligned            register=auto (the default: series on FLAIR's grid are left in place)
    aligned, on        register=on (those registered too)
    three grids        register=auto
    + motion           register=auto
    + motion, off      register=off (the headers' geometry alone: the motion stays)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO / "tests")]

import numpy as np  # noqa: E402
from dicom_studies import (Motion, mr_study, oblique_axial, patient_slices, regridded_study,  # noqa: E402
                           sagittal_3d)

from brainmets.inference import Predictor  # noqa: E402
from brainmets.precision import cpu_name  # noqa: E402
from brainmets.inputs.study import study_from_datasets  # noqa: E402
from brainmets.metrics import dice  # noqa: E402
from brainmets.study_results import segment_study  # noqa: E402

DATA = Path(os.environ.get("BRAINMETS_DATA", REPO.parent / "shared" / "data" / "lgg"))
GRIDS = {"AX T1 SE PRE": oblique_axial(), "AX T1 SE POST GAD": sagittal_3d()}
MOTIONS = {"AX T1 SE PRE": Motion(3.0, axis=(1.0, 1.0, 1.0), shift_mm=(1.5, -1.5, 1.3229)),  # 3 deg, 2.5 mm
           "AX T1 SE POST GAD": Motion(4.0, axis=(1.0, -0.5, 0.2), shift_mm=(-2.0, 1.0, 2.0))}  # 4 deg, 3 mm
ROWS = ("aligned", "aligned, on", "three grids", "+ motion", "+ motion, off")


def studies(slices):
    """(row, datasets, register) of one patient."""
    aligned = mr_study(slices).datasets
    grids = regridded_study(slices, GRIDS).datasets
    moved = regridded_study(slices, GRIDS, MOTIONS).datasets
    return [("aligned", aligned, "auto"), ("aligned, on", aligned, "on"), ("three grids", grids, "auto"),
            ("+ motion", moved, "auto"), ("+ motion, off", moved, "off")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="best")
    parser.add_argument("--patients", type=int, default=0, help="the first N validation patients (0: all)")
    args = parser.parse_args()
    patients = json.loads((REPO / "models/unetpp/split.json").read_text())["val"]
    patients = patients[:args.patients] if args.patients else patients
    predictor = Predictor.load(args.model)
    print(f"CPU: {cpu_name()}; model {predictor.name}; {len(patients)} validation patients")
    truth_dice = {row: [] for row in ROWS}
    aligned_dice = {row: [] for row in ROWS}
    seconds = {row: [] for row in ROWS}
    for patient in patients:
        slices, masks = patient_slices(DATA / patient)
        truth, reference, found = np.stack(masks) > 0, None, []
        for row, datasets, register in studies(slices):
            t0 = time.perf_counter()
            study = study_from_datasets(datasets, register=register)
            mask = segment_study(predictor, study).mask
            seconds[row].append(time.perf_counter() - t0)
            reference = mask if reference is None else reference
            truth_dice[row].append(dice(mask, truth))
            aligned_dice[row].append(dice(mask, reference))
            found += [f"{row}: {c.channel} {c.rotation_deg:.1f} deg {c.shift_mm:.1f} mm" for c in study.channels
                      if c.alignment == "registered" and row.startswith("+ motion")]
        print(f"{patient}: " + ", ".join(f"{row} {truth_dice[row][-1]:.3f}" for row in ROWS)
              + (f"; registration found {'; '.join(found)}" if found else ""), flush=True)
    print(f"{'':16}{'Dice vs truth':>15}{'vs aligned':>12}{'worst vs aligned':>18}{'seconds':>9}")
    for row in ROWS:
        print(f"{row:16}{statistics.mean(truth_dice[row]):15.4f}{statistics.mean(aligned_dice[row]):12.4f}"
              f"{min(aligned_dice[row]):18.4f}{statistics.median(seconds[row]):9.2f}")


if __name__ == "__main__":
    main()
