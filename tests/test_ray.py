"""`brainmets predict --ray` on a real Ray cluster on this machine (a head node and a worker node, `ray start` in
the fixture, stopped after): the masks of in-process runs, a worker killed mid-run costs nothing, a driver killed
mid-run is continued with only the missing or stale jobs redone, and bad addresses fail at once."""

from __future__ import annotations

import csv
import gzip
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest
from rich.console import Console

from brainmets.app.launch import free_port
from brainmets.batch import SUMMARY, find_jobs, run_batch
from conftest import write_dataset
from samples import brain, encode

RAY = Path(sys.executable).with_name("ray")
# A cluster on loopback for one test module: no usage report, and no token (Ray 2.60 turns token authentication
# on for a head node depending on what it finds in ~/.ray; the nodes and drivers here must agree).
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
NODE = ["--num-cpus", "1", "--object-store-memory", str(100 * 2**20), "--disable-usage-stats", "--block",
        "--node-ip-address", "127.0.0.1"]


@pytest.fixture(scope="module")
def cluster(models_root):
    """A head node and a worker node of one CPU each on loopback, serving `models_root`: the head's address."""
    if not RAY.exists():
        pytest.skip("ray is not installed (pip install -e .)")
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must fit 107 characters
    port = free_port()
    env = {**os.environ, "BRAINMETS_MODELS": str(models_root), "OMP_NUM_THREADS": "1", **RAY_ENV}
    nodes = [subprocess.Popen([str(RAY), "start", "--head", "--port", str(port), "--include-dashboard", "false",
                               "--temp-dir", str(temp), *NODE],
                              env=env, stdout=(temp / "head.log").open("w"), stderr=subprocess.STDOUT)]
    try:
        address = head_address(temp / "head.log", nodes[0])
        wait_for_nodes(address, 1, env)
        nodes.append(subprocess.Popen([str(RAY), "start", "--address", address, *NODE], env=env,
                                      stdout=(temp / "worker.log").open("w"), stderr=subprocess.STDOUT))
        wait_for_nodes(address, 2, env)
        yield address, nodes
    finally:
        for node in reversed(nodes):  # `ray start --block` stops what it started when it is stopped
            node.send_signal(signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.kill()
        shutil.rmtree(temp, ignore_errors=True)


def head_address(log: Path, head: subprocess.Popen, timeout_s: float = 90) -> str:
    """The address the head says it listens at: Ray may not keep the port asked for."""
    deadline = time.monotonic() + timeout_s
    while not (found := re.search(r"ray start --address='([^']+)'", log.read_text())):
        assert head.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.5)
    return found.group(1)


def wait_for_nodes(address: str, count: int, env: dict, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = subprocess.run([str(RAY), "status", "--address", address], env=env, capture_output=True, text=True)
        if status.returncode == 0 and status.stdout.count("node_") >= count:
            return
        time.sleep(1)
    raise TimeoutError(f"the Ray cluster at {address} did not show {count} node(s) in {timeout_s:g} s: "
                       f"{status.stdout[-800:]}{status.stderr[-800:]}")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Four patients' numbered slices (a study each) and eight lone slices: twelve jobs."""
    root = write_dataset(tmp_path_factory.mktemp("ray-inputs"), patients=4, slices=6)
    for seed in range(8):
        (root / "Data" / "lone").mkdir(exist_ok=True)
        (root / "Data" / "lone" / f"scan{seed}.png").write_bytes(encode(".png", brain(64, seed=seed)[0]))
    return root / "Data"


@pytest.fixture(scope="module")
def in_process(inputs, models_root, tmp_path_factory) -> Path:
    """The masks of the same jobs segmented in this process: what --ray must write."""
    out = tmp_path_factory.mktemp("in-process")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BRAINMETS_MODELS", str(models_root))
        jobs, _ = find_jobs([inputs], out)
        summary = run_batch(jobs, out, "attention-unet", progress=False, console=Console(file=open(os.devnull, "w")))
    assert summary.done == len(jobs) == 12
    return out


def predict(inputs: Path, out: Path, models_root: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "BRAINMETS_MODELS": str(models_root), "OMP_NUM_THREADS": "1", **RAY_ENV}
    return subprocess.Popen([sys.executable, "-m", "brainmets", "predict", str(inputs), "--out", str(out),
                             "-m", "attention-unet", "--no-progress", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def rows(out: Path) -> list[dict]:
    with (out / SUMMARY).open(newline="") as f:
        return list(csv.DictReader(f))


def assert_same_outputs(out: Path, expected: Path) -> None:
    """File for file: the same names, PNG masks and lesion tables byte for byte, NIfTI masks voxel for voxel
    (gzip stamps its own time)."""
    def files(root):
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                      if p.is_file() and p.name not in (SUMMARY, "provenance.json"))

    assert files(out) == files(expected) and files(out)
    for name in files(expected):
        if name.endswith(".nii.gz"):
            def voxels(p):
                return np.asanyarray(nib.Nifti1Image.from_bytes(gzip.decompress(p.read_bytes())).dataobj)

            np.testing.assert_array_equal(voxels(out / name), voxels(expected / name), err_msg=name)
        else:
            assert (out / name).read_bytes() == (expected / name).read_bytes(), name
    assert [r["model"] for r in rows(out)] == [r["model"] for r in rows(expected)]


def wait_for_rows(out: Path, count: int, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not ((out / SUMMARY).exists() and len(rows(out)) >= count):
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "no rows in time"
        time.sleep(0.05)


def segmenters(nodes: list[subprocess.Popen]) -> list[psutil.Process]:
    """The Ray workers of our cluster holding a model: descendants of our nodes named after the actor."""
    found = []
    for node in nodes:
        for child in psutil.Process(node.pid).children(recursive=True):
            try:
                if child.cmdline()[:1] == ["ray::Segmenter"] or child.name().startswith("ray::Segmenter"):
                    found.append(child)
            except psutil.NoSuchProcess:
                pass
    return found


def test_ray_writes_the_masks_of_an_in_process_run(cluster, inputs, in_process, models_root, tmp_path):
    address, _ = cluster
    run = predict(inputs, tmp_path / "out", models_root, "--ray", address)
    output = run.communicate(timeout=300)[0]
    assert run.returncode == 0, output
    assert "2 Ray workers of 1 thread on the Ray cluster at" in output and "12 files segmented" in output
    assert_same_outputs(tmp_path / "out", in_process)


def test_a_worker_killed_mid_run_loses_and_doubles_nothing(cluster, inputs, in_process, models_root, tmp_path):
    address, nodes = cluster
    out = tmp_path / "out"
    run = predict(inputs, out, models_root, "--ray", address)
    wait_for_rows(out, 1, run)
    victims = segmenters(nodes)
    assert victims, "no Ray worker holding a model was found"
    victims[0].kill()
    output = run.communicate(timeout=300)[0]
    assert run.returncode == 0, output
    files = [r["file"] for r in rows(out)]
    assert sorted(files) == sorted(set(files)) and len(files) == 12  # every job once
    assert all(r["status"] == "ok" for r in rows(out))
    assert_same_outputs(out, in_process)


def test_a_restart_after_the_driver_is_killed_redoes_only_missing_and_stale_jobs(cluster, inputs, in_process,
                                                                                 models_root, tmp_path):
    address, _ = cluster
    out = tmp_path / "out"
    run = predict(inputs, out, models_root, "--ray", address)
    wait_for_rows(out, 3, run)
    run.kill()
    run.wait()
    before = rows(out)
    assert 3 <= len(before) < 12, "the run finished before the kill: nothing was interrupted"
    stale = before[0]
    with (out / SUMMARY).open("w", newline="") as f:  # one job made by another model version
        writer = csv.DictWriter(f, before[0].keys())
        writer.writeheader()
        writer.writerows({**r, "model": "attention-unet-000000000000"} if r is stale else r for r in before)
    done_before = {r["file"] for r in before if r["status"] == "ok" and (out / r["mask"]).exists()}
    again = predict(inputs, out, models_root, "--ray", address)
    output = again.communicate(timeout=300)[0]
    assert again.returncode == 0, output
    redone = 12 - (len(done_before) - 1)
    assert f"{redone} files to segment" in output and f"{len(done_before) - 1} done by an earlier run" in output
    assert "1 made by another model version, redone" in output
    assert_same_outputs(out, in_process)


def test_an_address_nothing_answers_at_fails_at_once_naming_it(inputs, models_root, tmp_path):
    started = time.monotonic()
    run = predict(inputs, tmp_path / "out", models_root, "--ray", f"127.0.0.1:{free_port()}")
    output = run.communicate(timeout=120)[0]
    assert run.returncode == 2 and "no Ray cluster answers at 127.0.0.1:" in output, output
    assert "Traceback" not in output and time.monotonic() - started < 60
    bad = predict(inputs, tmp_path / "out", models_root, "--ray", "nowhere")
    assert bad.wait(timeout=120) == 2 and "expected HOST:PORT" in bad.communicate()[0]

