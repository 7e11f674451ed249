"""Shared fixtures: a small synthetic dataset in the Data.zip layout, a tiny trained model, the real data."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from brainmets.cache import preprocessed
from brainmets.config import PreprocessConfig, make_config
from brainmets.data import open_dataset
from brainmets.split import make_split

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("BRAINMETS_DATA", REPO.parent / "shared" / "data" / "lgg"))
MAKE_DATA_ZIP = REAL_DATA.parent / "make_data_zip.py"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Tests never read or fill the user's cache."""
    os.environ["BRAINMETS_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny test networks gain nothing from threads, and on a busy 2-core machine OpenMP threads waiting on
    each other make a training step up to 100x slower (0.02 s -> 2 s). Subprocesses inherit the setting."""
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def synthetic_slice(rng: np.random.Generator, size: int = 64, lesion: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A noisy 3-channel uint8 'brain' with, optionally, one bright ellipse lesion; the mask is 0/255."""
    image = rng.normal(60, 12, (size, size, 3)).clip(0, 255)
    mask = np.zeros((size, size), np.uint8)
    if lesion:
        center = tuple(int(c) for c in rng.integers(size // 4, 3 * size // 4, 2))
        axes = tuple(int(a) for a in rng.integers(size // 12, size // 6, 2))
        cv2.ellipse(mask, center, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
        image[mask > 0] += 90
    return image.clip(0, 255).astype(np.uint8), mask


def write_dataset(root: Path, patients: int = 4, slices: int = 12, size: int = 64, seed: int = 0) -> Path:
    """`root/Data/<patient>/<patient>_<n>.tif` + `_mask.tif`, slice numbers 1..slices; lesions in the middle third."""
    rng = np.random.default_rng(seed)
    for p in range(patients):
        patient = f"TCGA_XX_{1000 + p}_2000010{p % 9 + 1}"
        folder = root / "Data" / patient
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(1, slices + 1):
            image, mask = synthetic_slice(rng, size, lesion=slices // 3 < n <= 2 * slices // 3)
            cv2.imwrite(str(folder / f"{patient}_{n}.tif"), image[..., ::-1])  # OpenCV writes BGR
            cv2.imwrite(str(folder / f"{patient}_{n}_mask.tif"), mask)
    return root


def zip_folder(folder: Path, out: Path, macosx: bool = True) -> Path:
    with zipfile.ZipFile(out, "w") as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                rel = f.relative_to(folder).as_posix()
                z.write(f, rel)
                if macosx:
                    z.writestr(f"__MACOSX/{Path(rel).parent.as_posix()}/._{f.name}", b"\x00\x05\x16\x07" + bytes(78))
    return out


@pytest.fixture(scope="session")
def dataset_folder(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def dataset_zip(dataset_folder, tmp_path_factory) -> Path:
    return zip_folder(dataset_folder, tmp_path_factory.mktemp("zip") / "Data.zip")


def tiny_config(model: str = "attention-unet", **overrides):
    widths = {"attention-unet": (4, 8, 16), "unetpp": (4, 4, 8, 8, 16, 4)}[model]
    settings = dict(epochs=2, batch_size=4, crop_size=32, bf16=False, empty_fraction=0.5, missing_sequence_p=0.0,
                    preprocess=PreprocessConfig(image_size=64))
    settings.update(overrides)
    return make_config(model, "fast", widths=widths, **settings)


@pytest.fixture(scope="session")
def tiny_run(dataset_folder, tmp_path_factory) -> Path:
    """A run folder holding a tiny attention-unet trained 2 epochs on the synthetic data (best.pt, last.pt...)."""
    from brainmets.training import train

    cfg = tiny_config()
    dataset = open_dataset(dataset_folder)
    arrays = preprocessed(dataset, cfg.preprocess, progress=False)
    split = make_split(list(dataset.patients), seed=0, fingerprint=dataset.fingerprint())
    out = tmp_path_factory.mktemp("run")
    train(cfg, arrays, split, out, progress=False)
    return out


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data not found at {REAL_DATA} (set BRAINMETS_DATA to the folder of lgg patients)")
    return REAL_DATA


@pytest.fixture(scope="session")
def real_zip(real_data, tmp_path_factory) -> Path:
    """A Data.zip of 3 real patients, with __MACOSX junk, built by the dataset's own script."""
    patients = sorted(p.name for p in real_data.iterdir() if p.is_dir())[:3]
    out = tmp_path_factory.mktemp("real") / "Data.zip"
    subprocess.run([sys.executable, str(MAKE_DATA_ZIP), str(out), *patients, "--macosx"], check=True,
                   capture_output=True)
    return out


@pytest.fixture(scope="session")
def models_root(tiny_run, tmp_path_factory) -> Path:
    """A models/ folder laid out as shipped, for BRAINMETS_MODELS: attention-unet is the tiny trained model
    exported to ONNX (the better validation Dice in metrics.json, so it is `best`, though unetpp has the better
    test Dice: `best` is chosen on validation); unetpp a tiny untrained U-Net++ with no
    ONNX file (served by PyTorch), so `ensemble` averages two different networks."""
    import shutil

    import torch

    from brainmets.export import export_onnx
    from brainmets.models import build_model

    root = tmp_path_factory.mktemp("models")
    (root / "attention-unet").mkdir()
    shutil.copy(tiny_run / "best.pt", root / "attention-unet" / "model.pt")
    export_onnx(root / "attention-unet" / "model.pt")
    (root / "unetpp").mkdir()
    cfg = tiny_config("unetpp")
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg.model).state_dict(), "config": cfg.to_dict(), "epoch": 0},
               root / "unetpp" / "model.pt")
    cfg.save(root / "unetpp" / "config.json")
    for name, val, test in (("attention-unet", 0.6, 0.1), ("unetpp", 0.1, 0.7)):
        (root / name / "metrics.json").write_text(f'{{"model": "{name}", "checkpoint": "/secret/{name}.pt", '
                                                  f'"validation": {{"dice_per_patient_mean": {val}}}, '
                                                  f'"dice_per_patient_mean": {test}, "patients": 2}}\n')
    return root


@contextlib.contextmanager
def api_process(models_root: Path, folder: Path, **settings: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """The real API, `brainmets serve`, on a free loopback port serving `models_root` with these BRAINMETS_*
    variables, its output in `folder`/api.log: (base URL, process)."""
    from brainmets.app.launch import free_port, running, serve_command

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "BRAINMETS_MODELS": str(models_root), **settings}
    with running(serve_command("127.0.0.1", port), f"{url}/health", "API", folder / "api.log", env,
                 timeout_s=60) as process:
        wait_for_models(url)
        yield url, process


def wait_for_models(url: str, timeout_s: float = 120) -> None:
    """/health answers while the models still load in the background; tests that time requests start after."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        models = httpx.get(f"{url}/v1/models", timeout=30).json()["models"]
        if all(m["runtime"] for m in models if m["name"] != "ensemble"):
            return
        time.sleep(0.2)
    raise TimeoutError(f"the models at {url} did not load within {timeout_s:g} s")


@pytest.fixture(scope="session")
def api_server(models_root, tmp_path_factory):
    """The real API serving `models_root`, for the whole session: its base URL."""
    with api_process(models_root, tmp_path_factory.mktemp("api"), BRAINMETS_THREADS="1") as (url, _):
        yield url


def api_client(models_root: Path, **settings):
    """A FastAPI TestClient of the app serving `models_root`, with these Settings; a generator for fixtures."""
    from fastapi.testclient import TestClient

    from brainmets.api.main import create_app
    from brainmets.api.settings import Settings

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BRAINMETS_MODELS", str(models_root))
        with TestClient(create_app(Settings(**settings))) as client:
            yield client
