"""Shipping a run and regenerating the comparison report from the shipped files."""

import json

import pytest
from typer.testing import CliRunner

from brainmets.cache import preprocessed
from brainmets.checkpoints import load_checkpoint
from brainmets.cli import app
from brainmets.config import TrainConfig
from brainmets.data import open_dataset
from brainmets.report import METRICS
from brainmets.shipping import ship


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
    assert (cfg.threshold, cfg.min_lesion_px) == (tuned["threshold"], tuned["min_lesion_px"])
    assert TrainConfig.from_dict(ckpt["config"]) == cfg
    card = (folder / "MODEL_CARD.md").read_text()
    assert f"{metrics['dice_per_patient_mean']:.3f}" in card and "test machine" in card


def test_compare_regenerates_results(shipped, dataset_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINMETS_MODELS", str(shipped))
    docs = tmp_path / "docs"
    result = CliRunner().invoke(app, ["compare", "--data", str(dataset_folder), "--docs", str(docs)])
    assert result.exit_code == 0, result.output
    text = (docs / "results.md").read_text()
    for _, title in METRICS:
        assert title in text
    rows = [line for line in text.splitlines() if line.startswith("| attention-unet") or line.startswith("| unetpp")]
    assert len(rows) == 2
    for png in ("results-training-curves.png", "results-dice-per-patient.png", "results-overlays.png"):
        assert (docs / png).stat().st_size > 5000


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
