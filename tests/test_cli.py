"""The command line, run in-process with typer's CliRunner (and once as a real process for the error path)."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import typer.main
from typer.testing import CliRunner

from brainmets.cache import preprocessed
from brainmets.checkpoints import load_checkpoint, model_from_checkpoint
from brainmets.cli import app
from brainmets.data import open_dataset
from brainmets.evaluation import evaluate
from brainmets.inference import Predictor
from brainmets.split import Split
from conftest import synthetic_slice

REPORT_KEYS = {"patients", "slices", "dice_per_patient_mean", "dice_per_patient_median", "dice_lesion_slices_mean",
               "dice_pooled", "iou_pooled", "precision_pooled", "recall_pooled", "hd95_px_mean",
               "lesion_sensitivity", "lesion_fp_per_patient", "per_patient"}


def cli(*args: str, code: int = 0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    return result


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit code 2 and the error on one line, the last; progress lines may come before it."""
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert errors == [len(lines) - 1], result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def test_split(dataset_folder, tmp_path):
    cli("split", "--data", dataset_folder, "--out", tmp_path / "s.json", "--seed", 3)
    s = Split.load(tmp_path / "s.json")
    assert (len(s.train), len(s.val), len(s.test)) == (2, 1, 1) and s.seed == 3
    assert s.fingerprint == open_dataset(dataset_folder).fingerprint()
    cli("split", "--data", dataset_folder, "--out", tmp_path / "again.json", "--seed", 3)
    assert Split.load(tmp_path / "again.json") == s


def test_train_one_epoch(dataset_zip, tmp_path):
    out = tmp_path / "run"
    cli("train", "--data", dataset_zip, "--model", "attention-unet", "--out", out, "--epochs", 1, "--crop", 32,
        "--image-size", 64, "--fp32", "--empty-fraction", 0.5, "--whole-slice-phase", 0.25, "--no-progress")
    assert {"best.pt", "last.pt", "config.json", "split.json", "log.jsonl"} <= {p.name for p in out.iterdir()}
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["config"]["crop_size"] == 32 and ckpt["config"]["bf16"] is False
    assert ckpt["config"]["preprocess"]["image_size"] == 64 and ckpt["config"]["epochs"] == 1
    assert ckpt["config"]["empty_fraction"] == 0.5 and ckpt["config"]["whole_slice_phase"] == 0.25
    assert len((out / "log.jsonl").read_text().splitlines()) == 1
    # resuming keeps the run's 64-px slices; data prepared at the default 256 px is refused, not mixed in
    resumed = cli("train", "--data", dataset_zip, "--model", "attention-unet", "--out", out, "--resume",
                  "--no-progress", code=2)
    assert_one_line_error(resumed, "256-px", "64 px")
    assert load_checkpoint(out / "last.pt")["epoch"] == 1


def test_evaluate_all_writes_every_key(tiny_run, dataset_folder, tmp_path):
    cli("evaluate", "--data", dataset_folder, "--model", tiny_run, "--split", "all", "--out", tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert (report["patients"], report["slices"], report["split"]) == (4, 48, "all")
    assert [p["id"] for p in report["per_patient"]] == list(open_dataset(dataset_folder).patients)
    # the same numbers as the evaluation API on the same model and data, through the same engine
    predictor = Predictor.load(tiny_run)
    dataset = open_dataset(dataset_folder)
    direct = evaluate(predictor, preprocessed(dataset, predictor.preprocess_cfg, progress=False), list(dataset.patients))
    assert report["dice_per_patient_mean"] == pytest.approx(direct["dice_per_patient_mean"])
    assert (report["runtime"], report["postprocess"]["threshold"]) == ("torch", predictor.post.threshold)


def test_evaluate_test_side_uses_the_models_split(tiny_run, dataset_folder, tmp_path):
    result = cli("evaluate", "--data", dataset_folder, "--model", tiny_run / "best.pt", "--split", "test",
                 "--out", tmp_path / "t.json")
    report = json.loads((tmp_path / "t.json").read_text())
    test = Split.load(tiny_run / "split.json").test
    assert [p["id"] for p in report["per_patient"]] == test and report["patients"] == len(test)
    assert "dice_per_patient_mean" in result.stdout  # the table


def test_evaluate_test_side_on_other_data_is_refused(tiny_run, tmp_path):
    from conftest import write_dataset

    other = write_dataset(tmp_path / "other", patients=1, slices=2)
    other_patient = next((other / "Data").iterdir())
    other_patient.rename(other / "Data" / "someone")  # a non-TCGA folder: another patient id
    for f in (other / "Data" / "someone").iterdir():
        f.rename(f.with_name(f.name.replace("TCGA_XX_1000_20000101", "s")))
    result = cli("evaluate", "--data", other, "--model", tiny_run, "--split", "test", code=2)
    assert_one_line_error(result, "not in", "--split all")


def test_predict_writes_binary_masks_of_the_input_size(tiny_run, tmp_path):
    image, _ = synthetic_slice(np.random.default_rng(5), 64)
    wide = cv2.resize(image, (80, 72))
    cv2.imwrite(str(tmp_path / "scan one.png"), wide[..., ::-1])
    cv2.imwrite(str(tmp_path / "grey.tif"), wide[..., 0])
    cli("predict", tmp_path / "scan one.png", tmp_path / "grey.tif", "--model", tiny_run, "--out", tmp_path / "p")
    for stem in ("scan one", "grey"):
        mask = cv2.imread(str(tmp_path / "p" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (72, 80) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}


def test_predict_unreadable_input(tiny_run, tmp_path):
    (tmp_path / "x.png").write_bytes(b"not a png")
    assert_one_line_error(cli("predict", tmp_path / "x.png", "--model", tiny_run, "--out", tmp_path / "p", code=2))


def command_names() -> list[str]:
    return sorted(typer.main.get_command(app).commands)


def test_every_help():
    names = command_names()
    assert {"split", "train", "evaluate", "predict"} <= set(names)
    assert all(n in cli("--help").stdout for n in names)
    for name in names:
        text = cli(name, "--help").stdout
        assert "Usage" in text and name in text


@pytest.mark.parametrize("args", [
    ["split"],
    ["train", "--model", "attention-unet", "--out", "{tmp}/run"],
    ["evaluate", "--model", "{tiny_run}"],
])
def test_bad_data_path_is_one_line_exit_2(args, tiny_run, tmp_path):
    missing = tmp_path / "no" / "such" / "folder" / "with a long name to pass eighty columns" / "Data.zip"
    args = [a.format(tmp=tmp_path, tiny_run=tiny_run) for a in args]
    assert_one_line_error(cli(*args, "--data", missing, code=2), str(missing), "no such file or folder")


def test_data_not_a_zip(tmp_path):
    fake = tmp_path / "Data.zip"
    fake.write_text("hello")
    assert_one_line_error(cli("split", "--data", fake, code=2), str(fake), "not a zip archive")


def test_bad_data_message_with_brackets_is_printed_verbatim(tmp_path):
    folder = tmp_path / "scans [/x] [bold]"
    (folder / "p").mkdir(parents=True)
    (folder / "p" / "a_mask.png").write_bytes(b"")
    assert_one_line_error(cli("split", "--data", folder, code=2), str(folder / "p" / "a_mask.png"), "mask without image")


@pytest.mark.parametrize("args, fragment", [
    (["--crop", "40"], "crop 40 px: expected a multiple of 16"),
    (["--image-size", "64"], "crop 128 px"),  # the recipe's crop does not fit a 64-px slice
    (["--deep-supervision"], "unetpp only"),
    (["--val-every", "0"], "validate every 0 epochs: expected 1 or more"),
    (["--empty-fraction", "1.5"], "empty-slice fraction 1.5: expected 0 to 1"),
    (["--whole-slice-phase", "1"], "whole-slice phase 1.0: expected a share of the run"),
])
def test_bad_training_settings(args, fragment, dataset_folder, tmp_path):
    result = cli("train", "--data", dataset_folder, "--model", "attention-unet", "--out", tmp_path / "r", *args, code=2)
    assert_one_line_error(result, fragment)


def test_unknown_model(dataset_folder, tmp_path):
    assert_one_line_error(cli("evaluate", "--data", dataset_folder, "--model", tmp_path / "nothing.pt", code=2),
                          "unknown model")


def test_real_process_error_has_no_traceback(tmp_path):
    missing = tmp_path / "missing.zip"
    done = subprocess.run([sys.executable, "-m", "brainmets", "split", "--data", str(missing)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {missing}: no such file or folder"


def test_train_init_from_a_run_folder(tiny_run, dataset_zip, tmp_path):
    out = tmp_path / "tuned"
    cli("train", "--data", dataset_zip, "--model", "attention-unet", "--out", out, "--epochs", 1, "--crop", 32,
        "--image-size", 64, "--fp32", "--init-from", tiny_run, "--no-progress")
    assert load_checkpoint(out / "best.pt")["config"]["init_from"] == str(tiny_run / "best.pt")
    wrong = cli("train", "--data", dataset_zip, "--model", "unetpp", "--out", tmp_path / "u", "--epochs", 1,
                "--crop", 32, "--image-size", 64, "--init-from", tiny_run, "--no-progress", code=2)
    assert_one_line_error(wrong, "--init-from", "holds attention-unet, not the requested unetpp")
    assert not (tmp_path / "u").exists()


def test_evaluate_says_first_which_precision_runs_and_why(models_root, dataset_folder, monkeypatch):
    monkeypatch.delenv("BRAINMETS_PRECISION", raising=False)
    result = cli("evaluate", "--data", dataset_folder, "--model", models_root / "attention-unet" / "model.pt",
                 "--split", "all", "--device", "cpu")
    first = result.stderr.splitlines()[0]
    assert first.startswith("evaluating ") and " on openvino " in first, first
    assert "(measured: " in first or "(CPU has no bf16)" in first, first
    forced = cli("evaluate", "--data", dataset_folder, "--model", models_root / "attention-unet" / "model.pt",
                 "--split", "all", "--precision", "f32")
    assert "on openvino f32 (forced by BRAINMETS_PRECISION / --precision)" in forced.stderr.splitlines()[0]
    assert_one_line_error(cli("evaluate", "--data", dataset_folder, "--model", "best", "--precision", "fp16", code=2),
                          "unknown precision 'fp16'", "expected one of auto, bf16, f32")

