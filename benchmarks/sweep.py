"""The training-lever sweep: fixed-budget runs that each change one setting of a baseline, scored on validation.

    python benchmarks/sweep.py BASE_RUN RUN ... [--data DIR]

Each run folder comes from `brainmets train --time-budget M`, the runs one after the other on otherwise idle
cores. Its log gives the minutes, images, speed against the idle benchmark of its own step, and the best
epoch by training's rule; its best checkpoint's validation probabilities (full input, and FLAIR alone in all
three channels) get the post-processing tuned on validation as `brainmets ship` tunes it (kept in the run's
`sweep.json`, so each run is scored once). The lever is what the run's config changes from the first run's.
Test patients are not read.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from levers import standard_error, tuned

from brainmets.cache import preprocessed
from brainmets.config import TrainConfig
from brainmets.data import open_dataset
from brainmets.evaluation import engine_probabilities
from brainmets.inference import Predictor
from brainmets.report import Run

HERE = Path(__file__).resolve().parent
# The budget is the same for all and epochs only cap it; the post-processing is what `ship` chose afterwards
# (a shipped model's folder can be the baseline), re-tuned here for every run alike; init_from names the start.
NOT_LEVERS = {"time_budget_min", "epochs", "threshold", "min_lesion_px", "lesion_mode", "min_lesion_voxels",
              "init_sha256"}


def lever(cfg: dict, base: dict) -> str:
    changed = [f"{k} {base[k]} → {v}" for k, v in cfg.items() if k not in NOT_LEVERS and base.get(k) != v]
    return ", ".join(changed) or "baseline"


def scores(run: Path, arrays, val: list[str]) -> tuple[dict, dict]:
    """Tuned validation scores of the run's best checkpoint, full input and FLAIR alone; kept in
    `sweep.json` beside it, so a run is scored once even when the sweep is tabulated again."""
    cache, checkpoint = run / "sweep.json", run / "best.pt"
    if cache.exists() and cache.stat().st_mtime > checkpoint.stat().st_mtime:
        saved = json.loads(cache.read_text())
        return saved["full"], saved["flair"]
    predictor = Predictor.load(run, runtime="torch")
    full = tuned(arrays, val, engine_probabilities(predictor, arrays, val))
    flair = tuned(arrays, val, engine_probabilities(predictor, arrays, val, flair=True))
    cache.write_text(json.dumps({"full": full, "flair": flair}))
    return full, flair


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders; the first is the baseline")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("BRAINMETS_DATA", HERE.parents[1] / "shared" / "data" / "lgg")))
    args = ap.parse_args()
    configs = [TrainConfig.load(run / "config.json") for run in args.runs]
    val = json.loads((args.runs[0] / "split.json").read_text())["val"]
    if any(json.loads((run / "split.json").read_text())["val"] != val for run in args.runs):
        raise SystemExit("the runs were validated on different patients")
    arrays = preprocessed(open_dataset(args.data), configs[0].preprocess)
    base = configs[0].to_dict()

    rows, base_dice = [], None
    for run, cfg in zip(args.runs, configs):
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
        facts = Run(run.name, run, {}, log, cfg)  # a training run: no metrics until it is shipped
        best = max(facts.validated, key=lambda h: h["val_dice"])
        full, flair = scores(run, arrays, val)
        if base_dice is None:
            base_dice = full["per_patient"]
        diff = [a - b for a, b in zip(full["per_patient"], base_dice)]
        rows.append(f"| {run.name} | {lever(cfg.to_dict(), base)} | {facts.train_minutes:.0f} | "
                    f"{facts.images_per_s:.1f} ({facts.idle_share:.0%}) | "
                    f"{len(log)} ({sum(h['images'] for h in log):,}) | {best['val_dice']:.3f} (epoch {best['epoch']}) | "
                    f"{facts.validated[-1]['val_dice']:.3f} | {full['modes'][full['mode']]:.3f} ({full['mode']}) | "
                    + ("–" if run == args.runs[0] else f"{statistics.fmean(diff):+.3f} ± {standard_error(diff):.3f}")
                    + f" | {flair['modes'][flair['mode']]:.3f} |")
        print(rows[-1], flush=True)

    print(f"\n{len(val)} validation patients; PyTorch float32\n")
    print("| run | lever | minutes | img/s (of idle) | epochs (images) | best epoch, training's rule | last epoch, "
          "training's rule | tuned (mode) | tuned − baseline ± SE | FLAIR only, tuned |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
