"""Faults in training: a run killed with SIGKILL mid-epoch resumes from its last whole checkpoint; a full
disk fails with a clear error and leaves the previous checkpoint readable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from brainmets.checkpoints import load_checkpoint, save_atomic

ARGS = ["train", "--model", "attention-unet", "--epochs", "6", "--batch-size", "4", "--crop", "32",
        "--image-size", "64", "--fp32", "--threads", "1", "--no-progress"]


def epochs_logged(out) -> list[int]:
    log = out / "log.jsonl"
    return [json.loads(line)["epoch"] for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_loses_at_most_one_epoch(dataset_folder, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "brainmets", *ARGS, "--data", str(dataset_folder), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(epochs_logged(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    time.sleep(0.3)  # somewhere inside the next epoch, or inside its checkpoint write
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)

    # What the crash left is whole: the last checkpoint loads, and the log is its history, or one epoch
    # short of it when the kill fell between the checkpoint's rename and the log's.
    done = load_checkpoint(out / "last.pt")["epoch"]
    assert epochs_logged(out) in (list(range(1, done + 1)), list(range(1, done)))
    assert done >= 2
    load_checkpoint(out / "best.pt")

    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {out} at epoch {done + 1}" in resumed.stderr.replace("\n", "")
    assert epochs_logged(out) == [1, 2, 3, 4, 5, 6]
    assert load_checkpoint(out / "last.pt")["epoch"] == 6
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]  # a killed writer's leftovers are swept


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    save_atomic({"epoch": 1, "w": torch.ones(3)}, target)

    def full_disk(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="cannot write checkpoint .*last.pt.*No space left on device"):
        save_atomic({"epoch": 2, "w": torch.zeros(3)}, target)
    assert load_checkpoint(target)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # the half-written file is gone
