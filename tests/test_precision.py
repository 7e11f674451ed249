"""The precision each network runs in (measured per machine, vetoed by recorded disagreement, forced by a setting),
the slices per forward pass it takes (measured at that precision, cached in the same entry, forced by a setting)
and the device it runs on; bad settings are clear errors at start."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from typer.testing import CliRunner

from brainmets import precision
from brainmets.cache import preprocessed
from brainmets.checkpoints import load_hashed_checkpoint
from brainmets.data import open_dataset
from brainmets.inference import BATCH, DEVICE_ENV, Network, pick_device
from brainmets.precision import (AGREEMENT_KEY, BATCH_ENV, BATCH_SIZES, PRECISION_ENV, choose, choose_batch,
                                 recorded_agreement)
from brainmets.shipping import precision_agreement


def record(checkpoint, sha256: str, dice: dict[str, float]) -> None:
    """The agreement as `brainmets ship` records it in the metrics.json beside the checkpoint."""
    record = {"checkpoint_sha256": sha256, "bf16_dice_vs_f32": dice}
    (checkpoint.parent / "metrics.json").write_text(json.dumps({"patients": 2, AGREEMENT_KEY: record}))


def measured(f32_ms: float, bf16_ms: float, cached: bool = False):
    return lambda: ({"cpu": "Test CPU", "cores": 2, "ms": {"f32": f32_ms, "bf16": bf16_ms}}, cached)


@pytest.mark.parametrize("f32_ms, bf16_ms, faster, ratio", [(10.0, 17.0, "f32", "1.70x"), (17.0, 10.0, "bf16", "1.70x")])
def test_auto_keeps_the_faster_precision(f32_ms, bf16_ms, faster, ratio):
    choice = choose("auto", 0.995, True, measured(f32_ms, bf16_ms))
    assert choice.precision == faster
    assert choice.reason == f"measured: {faster} {ratio} faster than {({'f32', 'bf16'} - {faster}).pop()} on Test CPU, 2 cores"


def test_a_disagreeing_bf16_is_never_chosen_however_fast():
    choice = choose("auto", 0.97, True, measured(30.0, 10.0))
    assert (choice.precision, choice.reason) == ("f32", "bf16 disagrees with f32 (mask Dice 0.970 on a test patient)")
    assert choose("auto", 0.97, True).precision == "f32"  # on a GPU too


def test_forced_precision_and_missing_bf16_need_no_measurement():
    def never():
        raise AssertionError("measured although the choice was made")

    assert choose("bf16", 0.5, False, never) == precision.Choice("bf16", "forced by BRAINMETS_PRECISION / --precision")
    assert choose("auto", None, False, never) == precision.Choice("f32", "CPU has no bf16")
    assert "not recorded" in choose("auto", None, True, measured(20.0, 10.0, cached=True)).reason
    assert "(cached)" in choose("auto", None, True, measured(20.0, 10.0, cached=True)).reason


@pytest.fixture
def batches(monkeypatch):
    """A fake timing of the batch sizes (ms per slice at each; 4 fastest unless a test says otherwise), and the
    shapes it was asked to time."""
    calls = []

    def fake_timing(forward, x):
        calls.append(x.shape)
        assert x.shape == (max(BATCH_SIZES), 3, 64, 64)  # enough slices for the largest size, at the input size
        return dict(timing)

    timing = {1: 3.0, 4: 1.0, 16: 2.0}
    monkeypatch.setattr(precision, "time_batches", fake_timing)
    return timing, calls


@pytest.fixture
def model(models_root, tmp_path, monkeypatch, batches):
    """The tiny exported attention-unet in a folder of its own, with an empty cache and fake timings:
    (checkpoint, precision timing, precision timing calls); the batch timing is `batches`."""
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("model.pt", "model.onnx"):
        shutil.copy(models_root / "attention-unet" / name, folder / name)
    monkeypatch.setenv("BRAINMETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    monkeypatch.delenv(BATCH_ENV, raising=False)
    calls = []

    def fake_timing(forwards, x):
        calls.append(x.shape)
        assert set(forwards) == {"f32", "bf16"} and x.shape == (2, 3, 64, 64)  # a small batch at the input size
        return dict(timing)

    timing = {"f32": 10.0, "bf16": 20.0}
    monkeypatch.setattr(precision, "time_forwards", fake_timing)
    return folder / "model.pt", timing, calls


def cpu_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def test_the_measured_choice_is_cached_and_reused(model):
    checkpoint, timing, calls = model
    if not cpu_bf16():
        pytest.skip("this CPU has no bf16: OpenVINO runs f32 whatever is measured")
    first = Network.load(checkpoint, "openvino")
    assert (first.precision, len(calls)) == ("f32", 1) and first.precision_reason.startswith("measured: f32 2.00x")
    timing.update(f32=20.0, bf16=10.0)  # a new measurement would now pick bf16, but the cached one stands
    again = Network.load(checkpoint, "openvino")
    assert (again.precision, len(calls)) == ("f32", 1) and "(cached)" in again.precision_reason
    # the same weights elsewhere (another cache) are measured anew, and here bf16 wins
    (checkpoint.parent.parent / "cache" / "openvino").rename(checkpoint.parent.parent / "old-cache")
    fresh = Network.load(checkpoint, "openvino")
    assert (fresh.precision, len(calls)) == ("bf16", 2) and "agreement with f32 not recorded" in fresh.precision_reason


@pytest.mark.parametrize("damage", ["truncated", "other cpu", "other openvino"])
def test_an_unusable_cache_entry_is_measured_again(model, damage, caplog):
    checkpoint, _, calls = model
    Network.load(checkpoint, "openvino")
    [entry] = (checkpoint.parent.parent / "cache" / "openvino").glob("precision-*.json")
    text = entry.read_text()
    if damage == "truncated":
        entry.write_text(text[:len(text) // 2])
    else:
        key, value = {"other cpu": ("cpu", "AMD EPYC 9R14"), "other openvino": ("openvino", "2024.0")}[damage]
        entry.write_text(json.dumps({**json.loads(text), key: value}))
    with caplog.at_level(logging.INFO, logger="brainmets.precision"):
        net = Network.load(checkpoint, "openvino")
    assert len(calls) == 2 and net.precision_reason.startswith("measured") and "(cached)" not in net.precision_reason
    assert "measuring again" in caplog.text
    assert json.loads(entry.read_text()) == json.loads(text)  # rebuilt as it was


def test_a_recorded_disagreement_keeps_f32_and_is_said(model):
    checkpoint, timing, calls = model
    timing.update(f32=30.0, bf16=10.0)
    sha256 = load_hashed_checkpoint(checkpoint)[1]
    record(checkpoint, sha256, {"TCGA_A": 0.999, "TCGA_B": 0.962})
    net = Network.load(checkpoint, "openvino")
    assert net.precision == "f32" and net.precision_reason == "bf16 disagrees with f32 (mask Dice 0.962 on a test patient)"
    assert calls == []
    record(checkpoint, "0" * 64, {"TCGA_A": 0.5})  # measured on other weights: not believed
    assert recorded_agreement(checkpoint, sha256) is None


def test_a_forced_precision_wins_over_the_measurement(model, monkeypatch):
    checkpoint, timing, calls = model
    timing.update(f32=30.0, bf16=10.0)
    net = Network.load(checkpoint, "openvino", precision="f32")
    assert (net.precision, net.precision_reason) == ("f32", "forced by BRAINMETS_PRECISION / --precision")
    monkeypatch.setenv(PRECISION_ENV, "f32")
    assert Network.load(checkpoint, "openvino").precision == "f32" and calls == []


@pytest.mark.parametrize("fastest", BATCH_SIZES)
def test_the_fastest_batch_per_slice_is_kept_and_cached(model, batches, fastest):
    checkpoint, *_ = model
    timing, calls = batches
    timing.update({b: 1.0 if b == fastest else 2.0 + b for b in BATCH_SIZES})
    net = Network.load(checkpoint, "openvino")
    assert (net.batch, len(calls)) == (fastest, 1)
    assert net.batch_reason == "measured ms per slice: " + ", ".join(f"{timing[b]:.1f} at {b}" for b in BATCH_SIZES)
    assert net.summary.endswith(f", batch {fastest} ({net.batch_reason})")
    timing.update({b: 1.0 if b != fastest else 9.0 for b in BATCH_SIZES})  # a new measurement would pick another
    again = Network.load(checkpoint, "openvino")
    assert (again.batch, len(calls)) == (fastest, 1) and again.batch_reason.endswith("(cached)")


def test_batch_is_measured_per_precision_in_the_precision_entry(model, batches):
    checkpoint, timing, calls = model
    batch_calls = batches[1]
    if not cpu_bf16():
        pytest.skip("this CPU has no bf16: OpenVINO runs f32 whatever is asked")
    Network.load(checkpoint, "openvino")  # auto: f32 measured faster
    assert (len(calls), len(batch_calls)) == (1, 1)
    [entry] = (checkpoint.parent.parent / "cache" / "openvino").glob("precision-*.json")
    assert set(json.loads(entry.read_text())) >= {"ms", "f32_ms_per_slice_by_batch"}
    Network.load(checkpoint, "openvino", precision="bf16")  # another precision: its own batch measurement
    assert (len(calls), len(batch_calls)) == (1, 2)
    stored = json.loads(entry.read_text())
    assert stored["bf16_ms_per_slice_by_batch"] == stored["f32_ms_per_slice_by_batch"] == {"1": 3.0, "4": 1.0, "16": 2.0}
    auto = Network.load(checkpoint, "openvino")  # both kept: nothing measured again
    assert (len(calls), len(batch_calls)) == (1, 2) and "(cached)" in auto.precision_reason + auto.batch_reason


def test_a_forced_batch_wins_over_the_measurement_on_any_runtime(model, batches, monkeypatch):
    checkpoint, *_ = model
    monkeypatch.setenv(BATCH_ENV, "3")
    for runtime in ("openvino", "onnxruntime", "torch"):
        net = Network.load(checkpoint, runtime)
        assert (net.batch, net.batch_reason) == (3, "forced by BRAINMETS_BATCH")
    assert batches[1] == []
    monkeypatch.delenv(BATCH_ENV)
    assert Network.load(checkpoint, "onnxruntime").batch == BATCH  # a runtime that does not measure: the default
    assert choose_batch(None, BATCH) == (BATCH, "not measured for this runtime")


@pytest.mark.parametrize("value", ["0", "-2", "four", "2.5"])
def test_a_bad_forced_batch_is_a_clear_error(model, monkeypatch, value):
    checkpoint, *_ = model
    monkeypatch.setenv(BATCH_ENV, value)
    with pytest.raises(ValueError, match=rf"batch '{value}' \(BRAINMETS_BATCH\): expected a positive number"):
        Network.load(checkpoint, "openvino")


def test_unknown_settings_are_clear_errors(model, monkeypatch):
    checkpoint, *_ = model
    with pytest.raises(ValueError, match=r"unknown precision 'fp8' \(--precision or BRAINMETS_PRECISION\); expected "
                                         r"one of auto, bf16, f32"):
        Network.load(checkpoint, precision="fp8")
    monkeypatch.setenv(DEVICE_ENV, "gpu")
    with pytest.raises(ValueError, match="unknown device 'gpu'.*expected one of auto, cpu, cuda"):
        Network.load(checkpoint)


def test_auto_device_takes_a_gpu_only_where_pytorch_sees_one(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (pick_device(), pick_device("cpu")) == ("cpu", "cpu")
    with pytest.raises(ValueError, match="PyTorch sees no CUDA GPU"):
        pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (pick_device(), pick_device("cpu"), pick_device("auto", "torch")) == ("cuda", "cpu", "cuda")
    assert pick_device("auto", "openvino") == "cpu"  # a CPU runtime asked by name stays on the CPU
    with pytest.raises(ValueError, match="runtime onnxruntime runs on the CPU"):
        pick_device("cuda", "onnxruntime")


@pytest.mark.parametrize("command", [["predict", "x.png"], ["evaluate", "--data", "x", "--model", "best"],
                                     ["serve"], ["pacs", "segment", "1.2.3", "--url", "http://127.0.0.1:9/dicom-web"]])
def test_device_cuda_without_a_gpu_exits_non_zero_saying_so(command, monkeypatch):
    from brainmets.cli import app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    result = CliRunner().invoke(app, [*command, "--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert "error: device cuda asked (--device or BRAINMETS_DEVICE), but PyTorch sees no CUDA GPU here" in result.stderr


@pytest.mark.parametrize("env, fragment", [({PRECISION_ENV: "fp8"}, "Input should be 'auto', 'bf16' or 'f32'"),
                                           ({DEVICE_ENV: "cuda"}, "PyTorch sees no CUDA GPU"),
                                           ({BATCH_ENV: "0"}, "expected a positive number of slices")])
def test_the_api_refuses_bad_engine_settings_at_start(env, fragment, monkeypatch):
    from pydantic import ValidationError

    from brainmets.api.settings import Settings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError, match=fragment):
        Settings()


def test_shipping_records_bf16_agreement_that_auto_then_reads(model, dataset_folder):
    checkpoint, *_ = model
    if not cpu_bf16():
        pytest.skip("this CPU has no bf16: there is nothing to compare with f32")
    net = Network.load(checkpoint, "torch")
    arrays = preprocessed(open_dataset(dataset_folder), net.cfg.preprocess, progress=False)
    patients = arrays.patient_ids()[:2]
    agreement = precision_agreement(checkpoint, arrays, patients)
    sha256, dice = agreement["checkpoint_sha256"], agreement["bf16_dice_vs_f32"]
    assert sha256 == load_hashed_checkpoint(checkpoint)[1]
    assert set(dice) == set(patients) and all(0 <= d <= 1 for d in dice.values())
    record(checkpoint, sha256, dice)
    assert recorded_agreement(checkpoint, sha256) == min(dice.values())
