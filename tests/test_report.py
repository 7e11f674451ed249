"""Shipping a run and regenerating the comparison report from the shipped files."""

import dataclasses
import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from brainmets.cache import preprocessed
from brainmets.checkpoints import load_checkpoint
from brainmets.cli import app
from brainmets.config import PostprocessConfig, TrainConfig
from brainmets.data import open_dataset
from brainmets.report import (LESION_WISE, METRICS, Run, curve_label, failure_line, metric_columns,
                               results_table)
from brainmets.shipping import ship, write_model_card


@pytest.fixture(scope="module")
def shipped(tiny_run, dataset_folder, tmp_path_factory):
    cfg = TrainConfig.load(tiny_run / "config.json")
    arrays = preprocessed(open_dataset(dataset_folder), cfg.preprocess, progress=False)
    models = tmp_path_factory.mktemp("models")
    for name in ("attention-unet", "unetpp"):  # the same tiny run twice: what matters here is the plumbing
        ship(tiny_run, arrays, models / name, "test machine", "synthetic ellipses", onnx=name == "attention-unet")
    return models


def test_ship_writes_a_complete_model_folder(shipped, tiny_run):
    folder = shipped / "attention-unet"
    assert {p.name for p in folder.iterdir()} == {"model.pt", "model.onnx", "config.json", "split.json",
                                                  "log.jsonl", "metrics.json", "MODEL_CARD.md"}
    ckpt = load_checkpoint(folder / "model.pt")
    assert "optimizer" not in ckpt and ckpt["epoch"] == load_checkpoint(tiny_run / "best.pt")["epoch"]
    metrics = json.loads((folder / "metrics.json").read_text())
    split = json.loads((folder / "split.json").read_text())
    assert metrics["patients"] == len(split["test"]) and metrics["split"] == "test"
    tuned = metrics["validation_tuning"]
    cfg = TrainConfig.load(folder / "config.json")
    assert cfg.post == PostprocessConfig(**tuned["post"]) and metrics["postprocess"] == tuned["post"]
    assert TrainConfig.from_dict(ckpt["config"]) == cfg
    # chosen on validation: the validation report is the tuned setting's, and the other mode is also on test
    assert metrics["validation"]["dice_per_patient_mean"] == pytest.approx(
        tuned["modes"][cfg.lesion_mode]["dice_per_patient_mean"])
    assert metrics["validation"]["patients"] == len(split["val"])
    assert set(metrics["test_by_mode"]) == {"single", "multiple"} and metrics["flair_only"]["patients"] == len(split["test"])
    assert (metrics["runtime"], json.loads((shipped / "unetpp" / "metrics.json").read_text())["runtime"]) == \
        ("openvino", "torch")
    card = (folder / "MODEL_CARD.md").read_text()
    assert f"{metrics['dice_per_patient_mean']:.3f}" in card and "test machine" in card
    assert f"`{cfg.lesion_mode}` mode" in card and "FLAIR alone" in card
    run = Run.load("attention-unet", folder)
    assert 0 < run.idle_share and f"{run.idle_share:.0%} of the idle benchmark" in card


def test_a_fine_tuned_run_says_so_in_its_card_and_the_results(shipped, tmp_path):
    """Shipped over the folder it started from, the card's path names the new weights; the hash still names the old."""
    folder = tmp_path / "fine-tuned"
    shutil.copytree(shipped / "attention-unet", folder)
    run = Run.load("attention-unet", folder)
    start = dataclasses.replace(run.config, init_from="models/attention-unet/model.pt", init_sha256="0123456789abcdef" * 4)
    write_model_card(folder, dataclasses.replace(run, config=start), 1_000_000, 1, "test machine", "synthetic")
    card = (folder / "MODEL_CARD.md").read_text()
    assert "fine-tuned from the weights `models/attention-unet/model.pt` held when the run started " \
           "(sha256 0123456789abcdef)" in card
    on_top = "come on top of those of the model it started from"
    table = results_table([dataclasses.replace(run, config=start), run])
    assert f"| attention-unet | {run.config.recipe}, fine-tuned |" in table and on_top in table
    assert on_top not in results_table([run])
    assert (curve_label(dataclasses.replace(run, config=start)), curve_label(run)) == \
        ("attention-unet, fine-tune only", "attention-unet")


def test_the_shipped_engine_reproduces_the_model_card(shipped, dataset_folder, monkeypatch):
    """`brainmets evaluate --split test` on a shipped folder gives metrics.json's numbers: measured = served."""
    monkeypatch.setenv("BRAINMETS_MODELS", str(shipped))
    result = CliRunner().invoke(app, ["evaluate", "--data", str(dataset_folder), "--model", "attention-unet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((shipped / "attention-unet" / "metrics.json").read_text())
    assert f"{metrics['dice_per_patient_mean']:.4f}" in result.output


def test_select_tunes_the_ensemble_and_names_best_on_validation(shipped, dataset_folder, monkeypatch):
    monkeypatch.setenv("BRAINMETS_MODELS", str(shipped))
    result = CliRunner().invoke(app, ["select", "--data", str(dataset_folder)])
    assert result.exit_code == 0, result.output
    post = PostprocessConfig(**json.loads((shipped / "ensemble" / "postprocess.json").read_text()))
    metrics = json.loads((shipped / "ensemble" / "metrics.json").read_text())
    assert metrics["postprocess"] == dataclasses.asdict(post) and metrics["members"] == ["unetpp", "attention-unet"]
    scores = {n: json.loads((shipped / n / "metrics.json").read_text())["validation"]["dice_per_patient_mean"]
              for n in ("unetpp", "attention-unet", "ensemble")}
    assert f"best = {max(scores, key=scores.get)}" in result.output


def test_compare_regenerates_results(shipped, dataset_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINMETS_MODELS", str(shipped))
    docs = tmp_path / "docs"
    result = CliRunner().invoke(app, ["compare", "--data", str(dataset_folder), "--docs", str(docs)])
    assert result.exit_code == 0, result.output
    text = (docs / "results.md").read_text()
    for _, title in METRICS + LESION_WISE:  # the runs were evaluated now: they carry the lesion-wise scores
        assert title in text
    assert "HD95 374 (mm in the challenge, applied here in pixels" in text
    rows = [line for line in text.splitlines() if re.match(r"\| (\*\*)?(attention-unet|unetpp)\b", line)]
    assert len(rows) == 2 + 2  # the results table, then the selection table (`best` in bold)
    assert "Choosing `best`, on validation only" in text and (docs / "results-thresholds.png").stat().st_size > 5000
    for png in ("results-training-curves.png", "results-dice-per-patient.png", "results-overlays.png"):
        assert (docs / png).stat().st_size > 5000
    best = re.search(r"\| \*\*(\S+)\*\* \(`best`\)", text).group(1)
    flair = json.loads((shipped / best / "metrics.json").read_text())["flair_only"]["per_patient"]
    heading = f"With FLAIR alone in all three channels (a study without T1 series), `best` ({best}) on its worst test patients:"
    listed = text.split(heading)[1].split("\n\n")[1].splitlines()
    worst = sorted(flair, key=lambda p: p["dice"])[:3]
    assert listed == [f"- {failure_line(p)}" for p in worst] and len(listed) == min(3, len(flair))


def test_compare_without_anything_to_compare(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINMETS_MODELS", str(tmp_path))
    result = CliRunner().invoke(app, ["compare", "--docs", str(tmp_path / "docs")])
    assert result.exit_code == 2 and "nothing to compare" in result.output


def test_compare_overlays_need_a_model(shipped, dataset_folder, tmp_path):
    folder = tmp_path / "metrics-only"
    folder.mkdir()
    for name in ("metrics.json", "log.jsonl", "config.json"):
        (folder / name).write_bytes((shipped / "unetpp" / name).read_bytes())
    result = CliRunner().invoke(app, ["compare", "--run", f"x={folder}", "--data", str(dataset_folder),
                                      "--docs", str(tmp_path / "docs")])
    assert result.exit_code == 2 and "no compared folder holds a model.pt" in result.output


@pytest.mark.parametrize("precision, recall, kind", [(0.95, 0.40, "outlined too small"), (0.45, 0.92, "outlined too large"),
                                                     (0.50, 0.50, "off in both directions")])
def test_a_worst_patient_line_says_what_kind_of_miss_it_was(precision, recall, kind):
    row = {"id": "P", "dice": 0.6, "slices": 20, "lesion_slices": 5, "predicted_px": 2881, "true_px": 6120,
           "precision": precision, "recall": recall, "lesions": 1, "detected": 1, "false_positives": 0}
    line = failure_line(row)
    assert line.startswith("P: Dice 0.600; 5 of 20 slices hold lesion; 2,881 voxels predicted against 6,120 true")
    assert f"precision {precision:.2f}, recall {recall:.2f}: {kind})" in line
    old = {k: v for k, v in row.items() if k not in ("true_px", "precision", "recall")}  # an older report
    assert "2,881 voxels predicted; 1 of 1 lesions touched" in failure_line(old)


def test_lesion_wise_columns_only_where_a_report_carries_them(shipped):
    old = {k: v for k, v in json.loads((shipped / "unetpp" / "metrics.json").read_text()).items()
           if not k.startswith("lesion_wise")}  # a model shipped before evaluate computed them
    assert metric_columns([old]) == METRICS
    new = {**old, "lesion_wise_dice_mean": 0.25, "lesion_wise_hd95_mean": 120.5}
    assert metric_columns([old, new]) == METRICS + LESION_WISE
    run = Run.load("unetpp", shipped / "unetpp")
    table = results_table([dataclasses.replace(run, metrics=old)])
    assert "lesion-wise Dice" not in table
    table = results_table([dataclasses.replace(run, metrics=old, label="before"),
                           dataclasses.replace(run, metrics=new, label="after")])
    header, _, before, after = table.splitlines()[:4]
    assert header.split(" | ")[-6:-4] == ["lesion-wise Dice", "lesion-wise HD95 px"]
    assert before.split(" | ")[-6:-4] == ["–", "–"] and after.split(" | ")[-6:-4] == ["0.250", "120.500"]


def test_a_worst_patient_line_gives_the_lesion_wise_scores_when_the_report_has_them():
    row = {"id": "P", "dice": 0.6, "slices": 20, "lesion_slices": 5, "predicted_px": 2881, "lesions": 3,
           "detected": 2, "false_positives": 1}
    assert "Lesion-wise" not in failure_line(row)
    row |= {"lesion_wise_dice": 0.4, "lesion_wise_hd95": 150.25, "lesions_true": 3, "lesions_found": 2,
            "lesions_false": 1}
    assert failure_line(row).endswith(" Lesion-wise (BraTS-METS): Dice 0.400, HD95 150.2 px; 2 of 3 lesions found, "
                                      "1 false.")


def test_the_page_shows_the_lesion_wise_scores_where_the_metrics_carry_them():
    from brainmets.app import about, compare

    old = {"patients": 4, "dice_per_patient_mean": 0.7}
    new = {**old, "lesion_wise_dice_mean": 0.5, "lesion_wise_hd95_mean": 42.25}
    columns = metric_columns([old, new])
    assert compare.metrics_row("a", old, columns)["lesion-wise Dice"] is None
    assert compare.metrics_row("b", new, columns)["lesion-wise HD95 px"] == 42.25
    assert "lesion-wise Dice" not in compare.metrics_row("a", old)  # no model carries them: no column
    models = [{"name": "unetpp", "metrics": new}, {"name": "attention-unet", "metrics": old}]
    assert about.lesion_wise(models) == ("U-Net++: lesion-wise Dice 0.500, HD95 42.2 px on its test patients; "
                                         "Attention U-Net: not in its metrics.json yet (shipped before `brainmets "
                                         "evaluate` computed them).")
    assert about.lesion_wise([]) == "" and "when the API answers" in about.lesion_wise(None)
