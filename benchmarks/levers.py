"""What each inference-time lever is worth on the validation patients, and how far 9 of them can be trusted.

    python benchmarks/levers.py [--data DIR] [--extra LABEL=MODEL_FOLDER ...]

For every shipped candidate (each network and the ensemble) and any extra model folder (an older run, say),
the validation probabilities come from the serving engine, with and without flip TTA and with FLAIR alone in
all three channels; each variant gets its own post-processing tuned on validation (`tune_postprocessing`,
the rule `brainmets ship` uses), and the table gives its mean per-patient Dice per lesion mode. Test patients
are not read. Then the noise: the standard error of each mean over the validation patients, and of the paired
difference between candidates, which is what deciding between two models on validation has to beat.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
from pathlib import Path

from brainmets.cache import preprocessed
from brainmets.config import LESION_MODES, PostprocessConfig
from brainmets.data import open_dataset
from brainmets.evaluation import engine_probabilities, report, tune_postprocessing
from brainmets.inference import Predictor
from brainmets.registry import CANDIDATES, ENSEMBLE, SHIPPED, resolve

HERE = Path(__file__).resolve().parent


def tuned(arrays, patients, probs) -> dict:
    """Per lesion mode: validation Dice at its tuned rule, and the per-patient Dice of the chosen mode."""
    t = tune_postprocessing(arrays, patients, probs)
    per_patient = [p["dice"] for p in report(arrays, patients, probs, PostprocessConfig(**t["post"]))["per_patient"]]
    return {"modes": {m: t["modes"][m]["dice_per_patient_mean"] for m in LESION_MODES}, "mode": t["mode"],
            "post": t["post"], "per_patient": per_patient}


def standard_error(values: list[float]) -> float:
    return statistics.stdev(values) / len(values) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("BRAINMETS_DATA", HERE.parents[1] / "shared" / "data" / "lgg")))
    ap.add_argument("--extra", nargs="*", default=[], help="LABEL=MODEL_FOLDER (model.pt, split.json)")
    args = ap.parse_args()
    models = {name: name for name in CANDIDATES} | dict(e.split("=", 1) for e in args.extra)

    loaded = {CANDIDATES[0]: Predictor.load(CANDIDATES[0])}
    first = loaded[CANDIDATES[0]].networks[0]
    arrays = preprocessed(open_dataset(args.data), first.cfg.preprocess)
    val = json.loads((resolve(CANDIDATES[0]).parent / "split.json").read_text())["val"]
    for label, model in models.items():  # every candidate must have left the same patients out
        if model not in CANDIDATES and json.loads((resolve(model).parent / "split.json").read_text())["val"] != val:
            raise SystemExit(f"{label} was validated on other patients than the shipped models")
    print(f"{len(val)} validation patients; engine: {first.runtime} {first.precision}\n")

    variants = {"plain": {}, "flip TTA": {"tta": True}, "FLAIR only": {"flair": True}}
    probs = {}  # (label, variant) -> validation probabilities
    for label, model in models.items():
        if model == ENSEMBLE:  # the ensemble's probabilities are its networks' mean: no second inference
            for variant in variants:
                probs[label, variant] = sum(probs[n, variant] for n in SHIPPED) / len(SHIPPED)
            continue
        predictor = loaded.get(model) or Predictor.load(model)
        for variant, kwargs in variants.items():
            probs[label, variant] = engine_probabilities(predictor, arrays, val, **kwargs)
    rows, chosen = [], {}
    for (label, variant), p in probs.items():
        result = tuned(arrays, val, p)
        if variant == "plain":
            chosen[label] = result["per_patient"]
        rows.append((label, variant, result))
        print(f"{label} {variant}: " + ", ".join(f"{m} {d:.3f}" for m, d in result["modes"].items()), flush=True)

    print("\n| model | variant | validation Dice / patient, single | multiple | chosen: mode, threshold | "
          "standard error of the chosen mean |")
    print("|---|---|---|---|---|---|")
    for label, variant, r in rows:
        print(f"| {label} | {variant} | {r['modes']['single']:.3f} | {r['modes']['multiple']:.3f} | "
              f"{r['mode']}, {r['post']['threshold']:.2f} | {standard_error(r['per_patient']):.3f} |")

    print("\n| pair (plain, each at its tuned rule) | mean difference | standard error of the paired difference |")
    print("|---|---|---|")
    for a, b in itertools.combinations(chosen, 2):
        diff = [x - y for x, y in zip(chosen[a], chosen[b])]
        print(f"| {a} − {b} | {statistics.fmean(diff):+.3f} | {standard_error(diff):.3f} |")


if __name__ == "__main__":
    main()
