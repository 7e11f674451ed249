"""Data-parallel training under torchrun: 2 CPU processes (gloo) match 1 process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from brainmets.checkpoints import load_checkpoint
from brainmets.config import TrainConfig
from brainmets.models import build_model

# U-Net++ (instance norm: nothing couples the samples of a batch) with the seed recipe's BCE (a mean,
# so the average of two half-batch losses is the full-batch loss): exact equivalence is expected.
ARGS = ["train", "--model", "unetpp", "--recipe", "seed", "--epochs", "2",
        "--image-size", "64", "--threads", "1", "--no-progress"]


def run_training(data: Path, out: Path, processes: int, batch: int = 4) -> dict:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--standalone", "-m"] if processes > 1 else [sys.executable, "-m"]
    cmd = [*launcher, "brainmets", *ARGS, "--data", str(data), "--out", str(out), "--batch-size", str(batch)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return load_checkpoint(out / "last.pt")


def flat(state: dict) -> torch.Tensor:
    return torch.cat([state[k].float().flatten() for k in sorted(state)])


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(dataset_folder, tmp_path):
    one = run_training(dataset_folder, tmp_path / "one", 1)
    two = run_training(dataset_folder, tmp_path / "two", 2)
    half_batch = run_training(dataset_folder, tmp_path / "half", 1, batch=2)

    assert [h["processes"] for h in two["history"]] == [2, 2]
    for a, b in zip(one["history"], two["history"]):
        assert a["images"] == b["images"]
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    # Adam divides by the root of tiny second moments, so the summation order of the all-reduce moves a
    # few weights visibly; the whole update still agrees to a few percent, where a different batch
    # (what a wrong sharding amounts to) is far off.
    torch.manual_seed(0)  # training seeds the initial weights the same way
    init = flat(build_model(TrainConfig.from_dict(one["config"]).model).state_dict())
    w1, w2, w3 = flat(one["model"]), flat(two["model"]), flat(half_batch["model"])
    update = (w1 - init).norm()
    assert (w1 - w2).norm() / update < 0.1
    assert (w1 - w3).norm() / update > 0.3
    # Only the first process wrote: one log line per epoch, not two.
    assert len((tmp_path / "two" / "log.jsonl").read_text().splitlines()) == 2
    # And the distributed run resumes like any other.
    resumed = subprocess.run([sys.executable, "-m", "brainmets", *ARGS, "--epochs", "2", "--data", str(dataset_folder),
                              "--out", str(tmp_path / "two"), "--resume"], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr
