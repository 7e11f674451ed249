"""What registering series already on FLAIR's grid does to aligned studies: `register=on` against the
default `auto` (which leaves such series in place), on the validation patients of the shipped split.

    python benchmarks/registration.py [--model best] [--patients N]

Each patient's slices become an aligned three-series DICOM study (tests/dicom_studies.py `mr_study`: every
series on one grid, one frame of reference, the dataset's own co-registration); both settings go through the
study reader and the engine, and each mask is scored against the patient's ground truth (3-D Dice). Prints
what `on` moved (rotation, shift) per series and the Dice of both settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO / "tests")]

import numpy as np  # noqa: E402
from dicom_studies import mr_study, patient_slices  # noqa: E402

from brainmets.inference import Predictor  # noqa: E402
from brainmets.inputs.study import study_from_datasets  # noqa: E402
from brainmets.metrics import counts  # noqa: E402
from brainmets.study_results import segment_study  # noqa: E402

DATA = Path(os.environ.get("BRAINMETS_DATA", REPO.parent / "shared" / "data" / "lgg"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="best")
    parser.add_argument("--patients", type=int, default=0, help="the first N validation patients (0: all)")
    args = parser.parse_args()
    patients = json.loads((REPO / "models/unetpp/split.json").read_text())["val"]
    patients = patients[:args.patients] if args.patients else patients
    predictor = Predictor.load(args.model)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"CPU: {cpu}; model {predictor.name}; {len(patients)} validation patients")
    dice = {"auto": [], "on": []}
    for patient in patients:
        slices, masks = patient_slices(DATA / patient)
        datasets, truth = mr_study(slices).datasets, np.stack(masks) > 0
        moved, row = [], []
        for register in ("auto", "on"):
            study = study_from_datasets(datasets, register=register)
            mask = segment_study(predictor, study).mask
            dice[register].append(counts(mask, truth).dice)
            row.append(f"{register} {dice[register][-1]:.3f}")
            if register == "on":
                moved = [f"{c.channel} {c.alignment}" + (f" {c.rotation_deg:.2f} deg {c.shift_mm:.2f} mm"
                                                         if c.alignment == "registered" else "")
                         for c in study.channels if c.channel != "flair"]
        print(f"{patient}: Dice {', '.join(row)}; on moved: {'; '.join(moved)}", flush=True)
    for register, values in dice.items():
        print(f"{register}: mean Dice {statistics.mean(values):.4f}, median {statistics.median(values):.4f}")
    print(f"on - auto: {statistics.mean(dice['on']) - statistics.mean(dice['auto']):+.4f}")


if __name__ == "__main__":
    main()
