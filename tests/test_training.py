"""Training: the run folder it writes, exact resume, the time budget, clear errors, the seed recipe."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from brainmets import training
from brainmets.cache import preprocessed
from brainmets.checkpoints import load_checkpoint, model_from_checkpoint
from brainmets.config import PreprocessConfig, TrainConfig, make_config
from brainmets.data import open_dataset
from brainmets.split import Split, make_split
from brainmets.training import epoch_rows, learning_rate, make_loss, train
from conftest import tiny_config

LOG_KEYS = {"epoch", "train_loss", "val_dice", "seconds", "images_per_s", "idle_images_per_s"}


@pytest.fixture(scope="module")
def data(dataset_folder):
    dataset = open_dataset(dataset_folder)
    arrays = preprocessed(dataset, tiny_config().preprocess, progress=False)
    return arrays, make_split(list(dataset.patients), seed=0, fingerprint=dataset.fingerprint())


class Crash(Exception):
    pass


def test_run_folder(tiny_run, dataset_folder):
    assert {p.name for p in tiny_run.iterdir()} >= {"best.pt", "last.pt", "config.json", "split.json", "log.jsonl"}
    last = torch.load(tiny_run / "last.pt", weights_only=True)
    best = torch.load(tiny_run / "best.pt", weights_only=True)
    assert last["epoch"] == 2 and 1 <= best["epoch"] <= 2
    assert "optimizer" in last and "optimizer" not in best
    assert last["best_val_dice"] == best["best_val_dice"] == max(h["val_dice"] for h in last["history"])
    cfg = TrainConfig.load(tiny_run / "config.json")
    assert cfg == TrainConfig.from_dict(last["config"]) == tiny_config()
    split = Split.load(tiny_run / "split.json")
    assert dataclasses.asdict(split) == last["split"]
    assert split.fingerprint == open_dataset(dataset_folder).fingerprint()
    log = [json.loads(line) for line in (tiny_run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and log == last["history"]
    for r in log:
        assert LOG_KEYS <= set(r)
        assert r["seconds"] > 0 and r["images_per_s"] > 0 and np.isfinite(r["train_loss"]) and 0 <= r["val_dice"] <= 1
    # one idle benchmark per process, taken before the first epoch, is the reference of every epoch's speed
    assert log[0]["idle_images_per_s"] > 0 and len({r["idle_images_per_s"] for r in log}) == 1
    model, loaded_cfg = model_from_checkpoint(load_checkpoint(tiny_run / "best.pt"))
    assert loaded_cfg == cfg and not model.training
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_resume_gives_the_weights_of_an_uninterrupted_run(data, tmp_path, monkeypatch):
    arrays, split = data
    cfg = tiny_config(epochs=2)
    train(cfg, arrays, split, tmp_path / "whole", progress=False)

    real_lr = training.learning_rate

    def crash_in_second_epoch(c, progress):
        if progress == 0.5:  # the start of epoch 2 of 2
            raise Crash
        return real_lr(c, progress)

    monkeypatch.setattr(training, "learning_rate", crash_in_second_epoch)
    with pytest.raises(Crash):
        train(cfg, arrays, split, tmp_path / "halves", progress=False)
    assert torch.load(tmp_path / "halves" / "last.pt", weights_only=True)["epoch"] == 1
    assert len((tmp_path / "halves" / "log.jsonl").read_text().splitlines()) == 1
    monkeypatch.setattr(training, "learning_rate", real_lr)
    train(cfg, arrays, split, tmp_path / "halves", resume=True, progress=False)

    whole = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    halves = torch.load(tmp_path / "halves" / "last.pt", weights_only=True)
    assert halves["epoch"] == whole["epoch"] == 2
    torch.testing.assert_close(halves["model"], whole["model"])
    torch.testing.assert_close(halves["optimizer"]["state"], whole["optimizer"]["state"])
    assert [h["train_loss"] for h in halves["history"]] == pytest.approx([h["train_loss"] for h in whole["history"]])
    assert [h["epoch"] for h in halves["history"]] == [1, 2]


def test_resume_of_a_finished_run_trains_nothing_more(tiny_run, data, tmp_path):
    arrays, split = data
    out = tmp_path / "copy"
    out.mkdir()
    for name in ("last.pt", "best.pt", "log.jsonl"):
        (out / name).write_bytes((tiny_run / name).read_bytes())
    before = torch.load(out / "last.pt", weights_only=True)
    result = train(tiny_config(), arrays, split, out, resume=True, progress=False)
    assert result["epochs"] == 2
    torch.testing.assert_close(torch.load(out / "last.pt", weights_only=True)["model"], before["model"])


def test_same_seed_same_weights_other_seed_other_weights(data, tmp_path):
    arrays, split = data
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(tiny_config(epochs=1, seed=seed), arrays, split, tmp_path / name, progress=False)
        runs[name] = torch.load(tmp_path / name / "last.pt", weights_only=True)["model"]
    torch.testing.assert_close(runs["a"], runs["b"])
    assert any(not torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


class Clock:
    """A monotonic clock that moves `step` seconds each time it is read: every epoch looks long."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def monotonic(self) -> float:
        self.now += self.step
        return self.now


def test_time_budget_stops_cleanly_and_keeps_best(data, tmp_path, monkeypatch, capsys):
    arrays, split = data
    monkeypatch.setattr(training, "time", SimpleNamespace(monotonic=Clock(25.0).monotonic))
    result = train(tiny_config(epochs=4, time_budget_min=2.0), arrays, split, tmp_path, progress=False)
    assert 1 <= result["epochs"] < 4
    assert "time budget of 2.0 min reached" in capsys.readouterr().err
    best = load_checkpoint(tmp_path / "best.pt")
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == result["epochs"] and best["best_val_dice"] == result["best_val_dice"]
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == result["epochs"]
    assert not list(tmp_path.glob(".*tmp*"))  # no half-written checkpoint left behind


def test_val_every_validates_every_nth_epoch_and_the_last(data, tmp_path):
    arrays, split = data
    result = train(tiny_config(epochs=5, val_every=2), arrays, split, tmp_path, progress=False)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if "val_dice" in r] == [2, 4, 5]
    assert all(r["images_per_s"] > 0 for r in log)
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] in (2, 4, 5)
    assert best["best_val_dice"] == result["best_val_dice"] == max(r["val_dice"] for r in log if "val_dice" in r)
    with pytest.raises(ValueError, match="validate every 0 epochs"):
        tiny_config(val_every=0)


def test_a_time_budget_still_validates_the_last_epoch(data, tmp_path, monkeypatch):
    arrays, split = data
    monkeypatch.setattr(training, "time", SimpleNamespace(monotonic=Clock(25.0).monotonic))
    result = train(tiny_config(epochs=10, val_every=10, time_budget_min=6.0), arrays, split, tmp_path,
                   progress=False)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert 1 <= result["epochs"] < 10 and [r["epoch"] for r in log if "val_dice" in r] == [result["epochs"]]
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == result["epochs"]


def test_whole_slice_phase_ends_the_run_on_whole_slices_with_every_empty_slice(data, tmp_path):
    arrays, split = data
    train(tiny_config(epochs=4, whole_slice_phase=0.5), arrays, split, tmp_path, progress=False)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    train_slices = sum(len(arrays.rows(p)) for p in split.train)
    assert [r["crop"] for r in log] == [32, 32, 64, 64]
    assert [r["images"] for r in log][2:] == [train_slices] * 2 and log[0]["images"] < train_slices
    # each phase is measured against the benchmark of its own step
    crop_idle, whole_idle = log[0]["idle_images_per_s"], log[2]["idle_images_per_s"]
    assert log[1]["idle_images_per_s"] == crop_idle and log[3]["idle_images_per_s"] == whole_idle != crop_idle
    with pytest.raises(ValueError, match="whole-slice phase 1.0"):
        tiny_config(whole_slice_phase=1.0)


def test_unwritable_output_folder(data, tmp_path):
    arrays, split = data
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OSError, match=f"cannot write to output folder {blocker / 'run'}"):
        train(tiny_config(), arrays, split, blocker / "run", progress=False)


def test_resume_without_checkpoint(data, tmp_path):
    arrays, split = data
    with pytest.raises(FileNotFoundError, match=f"no checkpoint at {tmp_path / 'last.pt'}"):
        train(tiny_config(), arrays, split, tmp_path, resume=True, progress=False)


def test_resume_with_another_network_refused(tiny_run, data, tmp_path):
    arrays, split = data
    (tmp_path / "last.pt").write_bytes((tiny_run / "last.pt").read_bytes())
    with pytest.raises(ValueError, match="--resume"):
        train(tiny_config("unetpp"), arrays, split, tmp_path, resume=True, progress=False)


def test_arrays_of_another_size_refused(tiny_run, data, tmp_path, dataset_folder):
    """Resuming keeps the run's settings, so arrays preprocessed at another size would train silently wrong."""
    arrays, split = data
    small = preprocessed(open_dataset(dataset_folder), PreprocessConfig(image_size=32), progress=False)
    cfg32 = tiny_config(preprocess=PreprocessConfig(image_size=32))
    with pytest.raises(ValueError, match="32-px slices.*64 px"):
        train(tiny_config(), small, split, tmp_path / "fresh", progress=False)
    (tmp_path / "last.pt").write_bytes((tiny_run / "last.pt").read_bytes())
    with pytest.raises(ValueError, match="32-px slices.*64 px"):
        train(cfg32, small, split, tmp_path, resume=True, progress=False)


def test_unreadable_checkpoint(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable brainmets checkpoint"):
        load_checkpoint(tmp_path / "x.pt")


def test_seed_recipe_is_exactly_the_seed_project():
    cfg = make_config("attention-unet", "seed")
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.loss) == (50, 8, 0.001, "bce")
    assert (cfg.lr_schedule, cfg.crop_size, cfg.empty_fraction, cfg.bf16) == ("constant", None, 1.0, False)
    assert {learning_rate(cfg, e / cfg.epochs) for e in range(cfg.epochs)} == {0.001}
    logits, target = torch.randn(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()
    torch.testing.assert_close(make_loss(cfg)(logits, target),
                               torch.nn.functional.binary_cross_entropy_with_logits(logits, target))


def test_seed_recipe_trains_with_adam_on_whole_slices(data, tmp_path, monkeypatch):
    arrays, split = data
    made, shapes = [], []

    class RecordingAdam(torch.optim.Adam):
        def __init__(self, params, **kw):
            made.append(kw)
            super().__init__(params, **kw)

    real_loss = training.make_loss

    def recording_loss(cfg):
        loss = real_loss(cfg)

        def wrapped(output, target):
            shapes.append(tuple(target.shape))
            return loss(output, target)
        return wrapped

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    monkeypatch.setattr(training, "make_loss", recording_loss)
    cfg = dataclasses.replace(make_config("attention-unet", "seed", widths=(4, 8, 16), epochs=1),
                              preprocess=tiny_config().preprocess)
    train(cfg, arrays, split, tmp_path, progress=False)
    # the idle benchmark times the very same step first (6 steps of a throwaway model), then the run trains
    assert made == [{"lr": 0.001, "weight_decay": 0.0}] * 2
    train_slices = sum(len(arrays.rows(p)) for p in split.train)
    assert shapes == [(8, 1, 64, 64)] * (6 + train_slices // 8)  # every slice, whole, in batches of 8
    assert json.loads((tmp_path / "log.jsonl").read_text())["images"] == train_slices


def test_cosine_schedule():
    cfg = tiny_config(epochs=10, lr=0.002)
    assert learning_rate(cfg, 0) == pytest.approx(0.002)
    assert learning_rate(cfg, 0.5) == pytest.approx(0.001)
    lrs = [learning_rate(cfg, e / 10) for e in range(10)]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] > 0
    assert learning_rate(cfg, 1.0) == learning_rate(cfg, 1.5) == 0.0
    with pytest.raises(ValueError, match="expected constant or cosine"):
        learning_rate(dataclasses.replace(cfg, lr_schedule="step"), 0)


def test_dice_bce_loss_and_deep_supervision_average():
    cfg = tiny_config()
    loss = make_loss(cfg)
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:5, 2:5] = 1
    good, bad = (target * 20 - 10), -(target * 20 - 10)
    assert loss(good, target) < 0.05 < 1.0 < loss(bad, target)
    torch.testing.assert_close(loss([good, bad], target), (loss(good, target) + loss(bad, target)) / 2)
    with pytest.raises(ValueError, match="expected bce or dice_bce"):
        make_loss(dataclasses.replace(cfg, loss="focal"))


def test_epoch_rows(data):
    arrays, split = data
    rows = [i for p in split.train for i in arrays.rows(p)]
    lesion = [i for i in rows if arrays.masks[i].any()]
    empty = [i for i in rows if not arrays.masks[i].any()]
    for fraction in (0.0, 0.5, 1.0):
        chosen = epoch_rows(arrays, split.train, fraction, np.random.default_rng(0))
        assert set(lesion) <= set(chosen) <= set(rows) and len(set(chosen)) == len(chosen)
        assert len(chosen) == len(lesion) + round(len(empty) * fraction)
    assert epoch_rows(arrays, split.train, 0.5, np.random.default_rng(3)) == \
        epoch_rows(arrays, split.train, 0.5, np.random.default_rng(3))


def test_init_from_starts_at_the_given_weights_and_refuses_another_network(tiny_run, data, tmp_path):
    arrays, split = data
    base = load_checkpoint(tiny_run / "best.pt")
    # at learning rate 0 a fine-tuning run keeps the weights it starts from, exactly (batch norm's running
    # statistics still move in training mode: weights only)
    weights = [k for k in base["model"] if "running_" not in k and "num_batches" not in k]
    cfg = tiny_config(epochs=1, lr=0.0, init_from=str(tiny_run / "best.pt"))
    train(cfg, arrays, split, tmp_path / "tuned", progress=False)
    tuned = load_checkpoint(tmp_path / "tuned" / "best.pt")
    assert tuned["config"]["init_from"] == str(tiny_run / "best.pt")
    assert tuned["config"]["init_sha256"] == hashlib.sha256((tiny_run / "best.pt").read_bytes()).hexdigest()
    assert all(torch.equal(tuned["model"][k], base["model"][k]) for k in weights)
    # from random weights the same run ends elsewhere
    train(tiny_config(epochs=1, lr=0.0), arrays, split, tmp_path / "fresh", progress=False)
    fresh = load_checkpoint(tmp_path / "fresh" / "best.pt")
    assert not all(torch.equal(fresh["model"][k], base["model"][k]) for k in weights)
    with pytest.raises(ValueError, match="holds attention-unet of widths \\[4, 8, 16\\], not the requested unetpp"):
        train(tiny_config("unetpp", init_from=str(tiny_run / "best.pt")), arrays, split, tmp_path / "u", progress=False)
    with pytest.raises(ValueError, match="not the requested attention-unet of widths \\[8, 16, 32\\]"):
        wider = tiny_config(init_from=str(tiny_run / "best.pt"))
        wider = dataclasses.replace(wider, model=dataclasses.replace(wider.model, widths=(8, 16, 32)))
        train(wider, arrays, split, tmp_path / "w", progress=False)
