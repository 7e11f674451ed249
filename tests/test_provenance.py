"""One model identity: `registry.model` resolves every name in one place, and the fingerprint of a model as it runs
changes with everything that can change a mask (retune, TTA, lesion mode, precision, registration setting,
weights) and with nothing else (threads, batch size, the path the weights are read from, loading again)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from brainmets import registry
from brainmets.cli import app
from brainmets.inference import Predictor
from brainmets.provenance import fingerprint
from test_study_results import fixed_result, study  # noqa: F401  (fixture)


@pytest.fixture
def models(models_root, tmp_path, monkeypatch):
    """A copy of the shipped models to retune."""
    shutil.copytree(models_root, tmp_path / "models")
    monkeypatch.setenv("BRAINMETS_MODELS", str(tmp_path / "models"))
    return tmp_path / "models"


def version(name="attention-unet", tta=False, register="auto", **load):
    return fingerprint(Predictor.load(name, threads=1, **load), tta, register)


def test_every_name_resolves_in_the_registry(models):
    best = registry.model("best")
    assert best == registry.model("attention-unet")  # the better validation Dice in the fixture's metrics
    assert best.checkpoints == (models / "attention-unet" / "model.pt",) and best.post is None
    ensemble = registry.model("ensemble")
    assert ensemble.checkpoints == tuple(models / n / "model.pt" for n in registry.SHIPPED)
    assert registry.model(models / "unetpp").checkpoints == (models / "unetpp" / "model.pt",)
    with pytest.raises(FileNotFoundError, match="unknown model 'unet'"):
        registry.model("unet")


def test_what_changes_a_mask_changes_the_fingerprint(models):
    base = version()
    assert base.version.startswith("attention-unet-") and len(base.version) == len("attention-unet-") + 12
    changed = {
        "tta": version(tta=True),
        "register": version(register="on"),
        "lesion mode": version(lesion_mode="single" if base.post["mode"] == "multiple" else "multiple"),
        "precision": version(precision="bf16" if base.networks[0]["precision"] == "f32" else "f32"),
        "runtime": version(runtime="torch"),
    }
    assert len({base.digest, *(v.digest for v in changed.values())}) == 1 + len(changed), changed
    assert changed["precision"].networks[0]["precision"] != base.networks[0]["precision"]


def test_a_study_s_result_carries_the_registration_setting_the_study_was_read_with(models):
    from dicom_studies import mr_study
    from samples import brain

    from brainmets.inputs.study import study_from_datasets
    from brainmets.study_results import segment_study

    predictor = Predictor.load("attention-unet", threads=1)
    datasets = mr_study([brain(64, seed=s)[0] for s in range(3)]).datasets
    results = {r: segment_study(predictor, study_from_datasets(datasets, register=r)) for r in ("auto", "off")}
    assert {r: result.fingerprint.register for r, result in results.items()} == {"auto": "auto", "off": "off"}
    assert results["auto"].version == fingerprint(predictor, register="auto").version != results["off"].version


def test_a_retune_changes_the_fingerprint(models):
    """`brainmets select` rewrites the ensemble's postprocess.json; `brainmets ship` re-tunes a network in place,
    saving its checkpoint again with the new rule."""
    import torch

    before = {name: version(name, runtime="torch") for name in ("ensemble", "attention-unet")}
    post = dataclasses.asdict(Predictor.load("ensemble", "torch").post)
    (models / "ensemble").mkdir(exist_ok=True)
    (models / "ensemble" / "postprocess.json").write_text(json.dumps({**post, "threshold": 0.35}))
    assert version("ensemble", runtime="torch").digest != before["ensemble"].digest
    assert version("attention-unet", runtime="torch") == before["attention-unet"]  # not the network's own rule
    ckpt = torch.load(models / "attention-unet" / "model.pt", weights_only=True)
    ckpt["config"]["threshold"] = 0.35
    torch.save(ckpt, models / "attention-unet" / "model.pt")
    assert version("attention-unet", runtime="torch").digest != before["attention-unet"].digest


def test_nothing_else_changes_it(models, tmp_path):
    base = version()
    assert version() == base  # loading again
    # threads, at one precision (`auto` measures per thread count, and a precision of its own is a new version)
    forced = version(precision=base.networks[0]["precision"])
    assert fingerprint(Predictor.load("attention-unet", threads=2, precision=forced.networks[0]["precision"]),
                       register="auto") == forced
    elsewhere = tmp_path / "copy"
    shutil.copytree(models / "attention-unet", elsewhere)
    by_path = fingerprint(Predictor.load(elsewhere / "model.pt", threads=1), register="auto")
    assert by_path.digest == base.digest and by_path.version.startswith("checkpoint-")  # the weights, not the path


def test_the_batch_size_leaves_masks_unchanged(models, monkeypatch):
    """Why the batch size (measured per machine, or $BRAINMETS_BATCH) is not in the fingerprint: a stack in
    batches of 1 gives the masks of batches of 16."""
    rng = np.random.default_rng(0)
    stack = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(20)]
    masks = {}
    for batch in ("1", "16"):
        monkeypatch.setenv("BRAINMETS_BATCH", batch)
        predictor = Predictor.load("attention-unet", threads=1, precision="f32")
        assert predictor.networks[0].batch == int(batch)
        masks[batch] = predictor.predict_stack(stack).mask
    np.testing.assert_array_equal(masks["1"], masks["16"])


def test_seg_uids_derive_from_the_study_and_the_fingerprint(study, models):
    import io

    import pydicom

    predictor = Predictor.load("attention-unet", threads=1)
    result = fixed_result(study)

    def uids(tta: bool) -> tuple[str, str, str]:
        seg = pydicom.dcmread(io.BytesIO(dataclasses.replace(result, fingerprint=fingerprint(predictor, tta)).dicom_seg()))
        [algorithm] = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence
        assert algorithm.AlgorithmVersion == fingerprint(predictor, tta).version
        return seg.SeriesInstanceUID, seg.SOPInstanceUID, seg.SeriesDescription

    plain, again, with_tta = uids(False), uids(False), uids(True)
    assert plain == again and plain[2] == f"brainmets lesions {fingerprint(predictor).version}"
    assert plain[0] != with_tta[0] and plain[1] != with_tta[1]


@pytest.mark.slow
def test_export_best_exports_what_best_stands_for(models):
    (models / "attention-unet" / "model.onnx").unlink()
    result = CliRunner().invoke(app, ["export", "best"])
    assert result.exit_code == 0, result.output
    assert (models / "attention-unet" / "model.onnx").is_file()
    (models / "ensemble").mkdir(exist_ok=True)
    for name, val in (("ensemble", 0.9),):  # now `best` is the ensemble: both networks are exported
        (models / name / "metrics.json").write_text(json.dumps({"validation": {"dice_per_patient_mean": val}}))
    result = CliRunner().invoke(app, ["export", "best"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert (models / "unetpp" / "model.onnx").is_file() and result.output.count("written") == 2
    refused = CliRunner().invoke(app, ["export", "best", "--out", str(models / "x.onnx")], env={"COLUMNS": "200"})
    assert refused.exit_code == 2 and "uses 2 checkpoints" in refused.output
