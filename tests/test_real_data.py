"""On the real TCGA LGG data (skipped, with the reason shown, where it is absent)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from brainmets.cli import app
from brainmets.data import open_dataset
from brainmets.inputs.readers import decode_image
from test_cli import REPORT_KEYS


def first_three(real_data) -> list[str]:
    return sorted(p.name for p in real_data.iterdir() if p.is_dir())[:3]


def test_import_of_the_three_patient_zip(real_data, real_zip):
    ds = open_dataset(real_zip)
    patients = first_three(real_data)
    assert list(ds.patients) == patients
    for patient in patients:
        masks = sorted((real_data / patient).glob("*_mask.png"))
        numbers = sorted(int(m.stem[: -len("_mask")].rsplit("_", 1)[1]) for m in masks)
        assert [s.number for s in ds.patients[patient]] == numbers
    assert len(ds.slices) == sum(len(list((real_data / p).glob("*_mask.png"))) for p in patients)
    # the zip's TIFFs hold the same pixels as the lossless WebP/PNG originals
    pair = ds.patients[patients[0]][len(ds.patients[patients[0]]) // 2]
    stem = f"{patients[0]}_{pair.number}"
    original = decode_image((real_data / patients[0] / f"{stem}.webp").read_bytes())
    np.testing.assert_array_equal(ds.read_image(pair), original)
    mask = decode_image((real_data / patients[0] / f"{stem}_mask.png").read_bytes())
    np.testing.assert_array_equal(ds.read_mask(pair), (mask > 0).astype(np.uint8))
    assert ds.read_image(pair).shape == (256, 256, 3)


@pytest.mark.slow
def test_train_then_evaluate_end_to_end(real_zip, tmp_path):
    runner = CliRunner()
    started = time.monotonic()
    run = tmp_path / "run"
    # 128-px slices: 7 s here where the shipped 256 px takes 33 s on a busy 2-core machine
    trained = runner.invoke(app, ["train", "--model", "attention-unet", "--data", str(real_zip), "--out", str(run),
                                  "--epochs", "1", "--crop", "64", "--image-size", "128", "--fp32", "--no-progress"])
    assert trained.exit_code == 0, trained.output
    assert (run / "best.pt").exists() and len((run / "log.jsonl").read_text().splitlines()) == 1
    evaluated = runner.invoke(app, ["evaluate", "--data", str(real_zip), "--model", str(run), "--split", "all",
                                    "--out", str(tmp_path / "r.json")])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert report["patients"] == 3 and report["slices"] == len(open_dataset(real_zip).slices)
    assert 0 <= report["dice_per_patient_mean"] <= 1
    assert all({"id", "slices", "dice", "hd95_px"} <= set(p) for p in report["per_patient"])
    assert time.monotonic() - started < 120
