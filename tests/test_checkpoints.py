"""Checkpoint I/O and atomic writes; the serving path loads checkpoints without importing training."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from brainmets.checkpoints import (file_sha256, load_checkpoint, load_hashed_checkpoint, model_from_checkpoint,
                                   replacing, sweep_temporaries, write_atomic)
from brainmets.models import build_model
from conftest import tiny_config


def test_model_round_trips_through_a_checkpoint(tmp_path):
    cfg = tiny_config("unetpp")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, tmp_path / "m.pt")
    loaded, loaded_cfg = model_from_checkpoint(load_checkpoint(tmp_path / "m.pt"))
    x = torch.rand(1, 3, 32, 32)
    assert loaded_cfg == cfg and not loaded.training
    torch.testing.assert_close(loaded(x), model.eval()(x))


def test_hashed_load_names_the_bytes_it_loaded_and_refuses_a_broken_file(tmp_path):
    torch.save({"epoch": 3, "w": torch.arange(4)}, tmp_path / "m.pt")
    ckpt, sha256 = load_hashed_checkpoint(tmp_path / "m.pt")
    assert ckpt["epoch"] == 3 and torch.equal(ckpt["w"], torch.arange(4))
    assert sha256 == file_sha256(tmp_path / "m.pt") and len(sha256) == 64
    (tmp_path / "half.pt").write_bytes((tmp_path / "m.pt").read_bytes()[:100])
    with pytest.raises(ValueError, match="half.pt: not a readable brainmets checkpoint"):
        load_hashed_checkpoint(tmp_path / "half.pt")


def test_write_atomic_writes_text_and_bytes_and_creates_the_folder(tmp_path):
    write_atomic(tmp_path / "a" / "b" / "log.jsonl", "é\n")
    write_atomic(tmp_path / "mask.png", b"\x89PNG")
    assert (tmp_path / "a" / "b" / "log.jsonl").read_text(encoding="utf-8") == "é\n"
    assert (tmp_path / "mask.png").read_bytes() == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "mask.png"]  # no temporaries left


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path):
    target = tmp_path / "summary.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError), replacing(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.csv"]


def test_sweep_removes_only_temporaries(tmp_path):
    for name in (".last.pt.tmp-123", ".log.jsonl.tmp-9", "last.pt", ".hidden"):
        (tmp_path / name).write_text("x")
    sweep_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "last.pt"]


def test_serving_path_imports_nothing_of_training():
    """The API, the engine, export and batch prediction: no training module, no augmentation, no losses."""
    code = ("import json, sys; import brainmets.api.main, brainmets.batch, brainmets.export; "
            "print(json.dumps(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    modules = json.loads(done.stdout)
    assert "brainmets.api.main" in modules and "brainmets.checkpoints" in modules
    unwanted = [m for m in modules if m == "brainmets.training" or m.split(".")[0] == "albumentations"
                or m.startswith("monai.losses")]
    assert unwanted == []
