"""The comparison report: docs/results.md with its tables and figures, from evaluation reports and logs.

Each compared run is a folder holding `metrics.json` (a `brainmets evaluate` report on the test
patients), `log.jsonl` (the training log) and `config.json`. Nothing here trains or scores: every
number is read from those files, so the report can always be regenerated.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from brainmets.config import TrainConfig  # noqa: E402

METRICS = [  # (key in the evaluation report, column title)
    ("dice_per_patient_mean", "Dice / patient (mean)"),
    ("dice_per_patient_median", "Dice / patient (median)"),
    ("dice_lesion_slices_mean", "Dice / lesion slice"),
    ("dice_pooled", "Dice pooled"),
    ("iou_pooled", "IoU pooled"),
    ("precision_pooled", "precision"),
    ("recall_pooled", "recall"),
    ("hd95_px_mean", "HD95 px"),
    ("lesion_sensitivity", "lesion sensitivity"),
    ("lesion_fp_per_patient", "FP lesions / patient"),
]
LESION_WISE = [  # BraTS-METS 2023 lesion-wise scores: in reports from `evaluate` since they were added
    ("lesion_wise_dice_mean", "lesion-wise Dice"),
    ("lesion_wise_hd95_mean", "lesion-wise HD95 px"),
]
LESION_WISE_NOTE = ("Lesion-wise Dice and HD95 are the BraTS-METS 2023 ranking metrics (brainmets.lesionwise): each "
                    "true lesion scored against the predicted components touching it, a missed or a false lesion "
                    "scoring Dice 0 and HD95 374 (mm in the challenge, applied here in pixels: the reference data "
                    "carries no spacing), averaged per patient, then over patients.")


def metric_columns(metrics: list[dict]) -> list[tuple[str, str]]:
    """The table's metrics: every one of METRICS, and the lesion-wise ones where any report carries them
    (models shipped before `evaluate` computed them lack them until they are evaluated again)."""
    return METRICS + [(k, t) for k, t in LESION_WISE if any(m.get(k) is not None for m in metrics)]


@dataclass
class Run:
    label: str
    folder: Path
    metrics: dict
    log: list[dict]
    config: TrainConfig

    @classmethod
    def load(cls, label: str, folder: Path) -> Run:
        folder = Path(folder)
        for name in ("metrics.json", "log.jsonl", "config.json"):
            if not (folder / name).exists():
                raise FileNotFoundError(f"{folder / name} not found: a compared run needs metrics.json, "
                                        f"log.jsonl and config.json")
        log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]
        return cls(label, folder, json.loads((folder / "metrics.json").read_text()), log,
                   TrainConfig.load(folder / "config.json"))

    @property
    def validated(self) -> list[dict]:
        """The epochs that were validated (every one, unless the run validated every n-th)."""
        return [h for h in self.log if "val_dice" in h]

    @property
    def train_minutes(self) -> float:
        return sum(h["seconds"] for h in self.log) / 60

    @property
    def images_per_s(self) -> float:
        return statistics.median(h["images_per_s"] for h in self.log)

    @property
    def idle_images_per_s(self) -> float | None:
        """The idle benchmark the run took of its own step at its start (and at each resume); None for runs
        from before it did."""
        idle = [h["idle_images_per_s"] for h in self.log if h.get("idle_images_per_s")]
        return statistics.median(idle) if idle else None

    @property
    def idle_share(self) -> float | None:
        """Median over epochs of the epoch's speed against the benchmark of its own step (crops and whole
        slices differ)."""
        shares = [h["images_per_s"] / h["idle_images_per_s"] for h in self.log if h.get("idle_images_per_s")]
        return statistics.median(shares) if shares else None


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def results_table(runs: list[Run]) -> str:
    columns = metric_columns([r.metrics for r in runs])
    head = ["model", "recipe", *[title for _, title in columns], "epochs", "train min", "train img/s", "of idle"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        recipe = r.config.recipe + (", fine-tuned" if r.config.init_from else "")
        cells = [r.label, recipe, *[_fmt(r.metrics.get(k)) for k, _ in columns], str(len(r.log)),
                 f"{r.train_minutes:.0f}", f"{r.images_per_s:.1f}",
                 "–" if r.idle_share is None else f"{r.idle_share:.0%}"]
        lines.append("| " + " | ".join(cells) + " |")
    if any(r.config.init_from for r in runs):
        lines.append("\nA fine-tuned run's epochs and minutes come on top of those of the model it started from "
                     "(its model card names that model).")
    return "\n".join(lines)


def curve_label(run: Run) -> str:
    """A fine-tuned run's log starts at its starting model's end: its curve's minutes are the fine-tune's only."""
    return f"{run.label}, fine-tune only" if run.config.init_from else run.label


def plot_training_curves(runs: list[Run], out: Path) -> None:
    fig, (ax_dice, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        minutes = np.cumsum([h["seconds"] for h in r.log]) / 60
        scored = [i for i, h in enumerate(r.log) if "val_dice" in h]
        ax_dice.plot(minutes[scored], [r.log[i]["val_dice"] for i in scored], marker=".", label=curve_label(r))
        ax_loss.plot(minutes, [h["train_loss"] for h in r.log], marker=".",
                     label=f"{curve_label(r)} ({r.config.loss})")
    ax_dice.set(xlabel="training minutes (2-core CPU)", ylabel="validation Dice per patient", ylim=(0, 1))
    ax_loss.set(xlabel="training minutes (2-core CPU)", ylabel="training loss", yscale="log")
    for ax in (ax_dice, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_dice_distribution(runs: list[Run], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(2.2 + 2 * len(runs), 4))
    values = [[p["dice"] for p in r.metrics["per_patient"]] for r in runs]
    ax.boxplot(values, showmeans=True)
    rng = np.random.default_rng(0)
    for i, v in enumerate(values, start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(v)), v, s=14, alpha=0.6, zorder=3)
    ax.set_xticks(range(1, len(runs) + 1), [r.label for r in runs])
    ax.set(ylabel="Dice per test patient (3-D)", ylim=(-0.02, 1.02))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_overlays(examples: list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]], out: Path) -> None:
    """examples: (title, patient, enhanced uint8 (S,S,3), ground truth (S,S), prediction (S,S))."""
    fig, axes = plt.subplots(1, len(examples), figsize=(4 * len(examples), 4.3))
    for ax, (title, patient, image, truth, pred) in zip(np.atleast_1d(axes), examples):
        ax.imshow(image[..., 1], cmap="gray")  # FLAIR, the sequence the masks were drawn on
        for mask, colour in ((truth, "lime"), (pred, "red")):
            if mask.any():
                ax.contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=1.2)
        ax.set_title(f"{title}\n{patient}", fontsize=9)
        ax.axis("off")
    fig.suptitle("ground truth (green) and prediction (red) on FLAIR", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))  # room for the suptitle above the panel titles
    fig.savefig(out, dpi=110)
    plt.close(fig)


def overlay_examples(run: Run, arrays, predict) -> list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]]:
    """The best, median and three worst test patients of `run`, each at its slice with the most lesion.

    `predict(images uint8 (N,S,S,3)) -> bool masks (N,S,S)`.
    """
    ranked = sorted(run.metrics["per_patient"], key=lambda p: p["dice"], reverse=True)
    picks = [("best", ranked[0]), ("median", ranked[len(ranked) // 2]),
             *((f"worst {i}", p) for i, p in enumerate(ranked[:-4:-1], 1))]
    examples = []
    for title, p in picks:
        rows = arrays.rows(p["id"])
        truth = np.asarray(arrays.masks[rows.start:rows.stop])
        images = np.asarray(arrays.images[rows.start:rows.stop])
        pred = predict(images)
        area = truth.sum(axis=(1, 2)) if truth.any() else pred.sum(axis=(1, 2))
        i = int(np.argmax(area))
        examples.append((f"{title}: Dice {p['dice']:.3f}", p["id"], images[i], truth[i], pred[i]))
    return examples


def selection_table(shipped: dict[str, dict], best: str) -> str:
    """The shipped candidates as `best` chooses between them (validation) beside what test then said."""
    head = ["candidate", "validation Dice / patient", "mode", "threshold", "min 3-D lesion (voxels)",
            "test Dice / patient (mean)", "(median)", "worst test patient", "empty predictions",
            "FP lesions / patient", "test Dice, other mode", "test Dice, FLAIR only", "runtime"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in shipped.items():
        post = m["postprocess"]
        other = next(r for mode, r in m["test_by_mode"].items() if mode != post["mode"])
        cells = [f"**{name}** (`best`)" if name == best else name, _fmt(m["validation"]["dice_per_patient_mean"]),
                 post["mode"], _fmt(post["threshold"]), str(post["min_lesion_voxels"]),
                 _fmt(m["dice_per_patient_mean"]), _fmt(m["dice_per_patient_median"]), _fmt(m["dice_per_patient_min"]),
                 str(m["empty_predictions"]), _fmt(m["lesion_fp_per_patient"]),
                 _fmt(other["dice_per_patient_mean"]), _fmt(m["flair_only"]["dice_per_patient_mean"]),
                 f"{m['runtime']} {m['precision']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_threshold_curves(shipped: dict[str, dict], out: Path) -> None:
    """Validation Dice against the threshold, per candidate and lesion mode, at the chosen smallest lesion."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, m in shipped.items():
        post = m["postprocess"]
        for mode in ("single", "multiple"):
            voxels = m["validation_tuning"]["modes"][mode]["post"]["min_lesion_voxels"]
            points = sorted((g["threshold"], g["dice_per_patient_mean"]) for g in m["validation_tuning"]["grid"]
                            if g["mode"] == mode and g["min_lesion_voxels"] == voxels)
            line, = ax.plot(*zip(*points), marker=".", linestyle="-" if mode == "multiple" else "--",
                            label=f"{name}, {mode} (≥{voxels} vox)")
            if mode == post["mode"]:
                ax.axvline(post["threshold"], color=line.get_color(), alpha=0.4, linewidth=3)
    ax.set(xlabel="threshold", ylabel="validation Dice per patient")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def failure_line(p: dict) -> str:
    """One test patient's miss, in numbers: how much was predicted against the truth, whether its lesions were
    found, what else, and which kind of miss that makes."""
    found = f"{p['detected']} of {p['lesions']} lesions touched" if p["lesions"] else "no lesion in the ground truth"
    predicted = f"{p['predicted_px']:,} voxels predicted"
    if "true_px" in p:  # reports written before the per-patient truth size was kept lack it
        predicted += f" against {p['true_px']:,} true"
        if p["precision"] is not None and p["recall"] is not None:
            predicted += f" (precision {p['precision']:.2f}, recall {p['recall']:.2f}: {_miss_kind(p)})"
    line = (f"{p['id']}: Dice {p['dice']:.3f}; {p['lesion_slices']} of {p['slices']} slices hold lesion; "
            f"{predicted}; {found}; {p['false_positives']} predicted components touching no lesion.")
    if p.get("lesion_wise_dice") is not None:  # reports from before the lesion-wise scores lack them
        line += (f" Lesion-wise (BraTS-METS): Dice {p['lesion_wise_dice']:.3f}, HD95 {p['lesion_wise_hd95']:.1f} px; "
                 f"{p['lesions_found']} of {p['lesions_true']} lesions found, {p['lesions_false']} false.")
    return line


def _miss_kind(p: dict) -> str:
    if p["recall"] < 0.8 <= p["precision"]:
        return "outlined too small"
    if p["precision"] < 0.8 <= p["recall"]:
        return "outlined too large"
    return "off in both directions" if p["recall"] < 0.8 else "close on both counts"


def _worst_three(per_patient: list[dict]) -> list[str]:
    return [f"- {failure_line(p)}" for p in sorted(per_patient, key=lambda p: p["dice"])[:3]]


def _lesion_wise_line(runs: list[Run]) -> str:
    carried = [r.label for r in runs if r.metrics.get("lesion_wise_dice_mean") is not None]
    if not carried:
        return ("Lesion-wise (BraTS-METS) Dice and HD95: not in these runs' metrics.json, written before `brainmets "
                "evaluate` computed them; evaluating a run again adds them.")
    missing = [r.label for r in runs if r.label not in carried]
    return LESION_WISE_NOTE + (f" Not in the metrics.json of {', '.join(missing)} (written before `brainmets "
                               "evaluate` computed them): –." if missing else "")


def write_results(runs: list[Run], docs: Path, examples=None, shipped: dict[str, dict] | None = None,
                  best: str | None = None, examples_of: str | None = None) -> Path:
    """docs/results.md and its figures (results-*.png)."""
    docs.mkdir(parents=True, exist_ok=True)
    plot_training_curves(runs, docs / "results-training-curves.png")
    plot_dice_distribution(runs, docs / "results-dice-per-patient.png")
    test_sets = {r.label: r.metrics["patients"] for r in runs}
    lines = [
        "# Results",
        "",
        "Generated by `brainmets compare` from each run's `metrics.json` (a `brainmets evaluate` report on the",
        "test patients of its `split.json`) and `log.jsonl`; do not edit by hand.",
        "",
        f"Test patients per run: {', '.join(f'{k}: {v}' for k, v in test_sets.items())}. Dice per patient is",
        "3-D over all slices of the patient (Buda et al. 2019 report 0.82 mean on this dataset); HD95 in",
        "pixels (≈ mm at this resolution) over patients where both masks are non-empty.",
        "",
        results_table(runs),
        "",
        _lesion_wise_line(runs),
        "",
        "![training curves](results-training-curves.png)",
        "",
        "![Dice per test patient](results-dice-per-patient.png)",
        "",
    ]
    if shipped:
        plot_threshold_curves(shipped, docs / "results-thresholds.png")
        lines += ["## Choosing `best`, on validation only", "",
                  "Each candidate's post-processing (threshold, lesion mode, smallest 3-D lesion) was tuned on the",
                  "validation patients, thresholds on a plateau (each scored with its two neighbours), and `best`",
                  "is the candidate with the higher validation Dice; the test columns were computed once, after.",
                  "", selection_table(shipped, best), "",
                  "![validation Dice against the threshold](results-thresholds.png)", ""]
        flair = shipped[best]["flair_only"].get("per_patient")
        if flair:  # reports shipped before the FLAIR-alone rows were kept lack them
            lines += [f"With FLAIR alone in all three channels (a study without T1 series), `best` ({best}) on its "
                      "worst test patients:", "", *_worst_three(flair), ""]
    if examples:
        plot_overlays(examples, docs / "results-overlays.png")
        lines += [f"Examples of {examples_of or runs[0].label}: the best, median and three worst test patients (ground truth",
                  "green, prediction red).", "", "![overlays](results-overlays.png)", ""]
        run = next((r for r in runs if r.label == examples_of), runs[0])
        lines += ["What the worst test patients' masks did:", "", *_worst_three(run.metrics["per_patient"]), ""]
    out = docs / "results.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    return out
