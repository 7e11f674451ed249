"""Preprocessed arrays of a dataset, decoded once and memory-mapped thereafter.

Keyed by the dataset's fingerprint and the preprocessing settings, under `$BRAINMETS_CACHE` (default
`~/.cache/brainmets`). Written to a temporary folder and renamed into place, so a crash never leaves
a half-written cache that a later run would trust.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import Progress

from brainmets.config import PreprocessConfig
from brainmets.data import DataError, Dataset
from brainmets.preprocessing import enhance, resize_mask

CACHE_VERSION = 1


@dataclass
class Arrays:
    images: np.ndarray  # uint8 (N, S, S, 3): enhance() of every slice
    masks: np.ndarray  # uint8 (N, S, S), 0/1
    patients: list[str]  # patient of each row; rows of a patient are contiguous, in slice order
    numbers: list[int]

    def rows(self, patient: str) -> range:
        first = self.patients.index(patient)
        return range(first, first + self.patients.count(patient))

    def patient_ids(self) -> list[str]:
        return list(dict.fromkeys(self.patients))


def cache_root() -> Path:
    return Path(os.environ.get("BRAINMETS_CACHE", Path.home() / ".cache" / "brainmets"))


def _key(dataset: Dataset, cfg: PreprocessConfig) -> str:
    settings = json.dumps([CACHE_VERSION, dataset.fingerprint(), dataclasses.asdict(cfg)], sort_keys=True)
    return hashlib.sha1(settings.encode()).hexdigest()[:20]


def preprocessed(dataset: Dataset, cfg: PreprocessConfig, root: Path | None = None,
                 progress: bool = True) -> Arrays:
    """The dataset's arrays, from the cache or built (and cached) now."""
    folder = (root or cache_root()) / _key(dataset, cfg)
    if not (folder / "index.json").exists():
        _build(dataset, cfg, folder, progress)
    index = json.loads((folder / "index.json").read_text())
    return Arrays(
        images=np.load(folder / "images.npy", mmap_mode="r"),
        masks=np.load(folder / "masks.npy", mmap_mode="r"),
        patients=index["patients"], numbers=index["numbers"],
    )


def _build(dataset: Dataset, cfg: PreprocessConfig, folder: Path, progress: bool) -> None:
    slices = dataset.slices
    size = cfg.image_size
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, (len(slices), size, size, 3))
        masks = np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.uint8, (len(slices), size, size))
        shapes: dict[str, tuple[int, int]] = {}
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("preprocessing slices", total=len(slices))
            for i, pair in enumerate(slices):
                image, mask = dataset.read_image(pair), dataset.read_mask(pair)
                where = dataset.source.describe(pair.image)
                if image.shape[:2] != mask.shape[:2]:
                    raise DataError(f"{where}: image is {image.shape[1]}x{image.shape[0]} px but its mask is "
                                    f"{mask.shape[1]}x{mask.shape[0]}")
                first = shapes.setdefault(pair.patient, image.shape[:2])
                if image.shape[:2] != first:
                    raise DataError(f"{where}: size {image.shape[1]}x{image.shape[0]} differs from the other "
                                    f"slices of patient {pair.patient} ({first[1]}x{first[0]})")
                try:
                    images[i] = enhance(image, cfg)
                except ValueError as e:
                    raise DataError(f"{where}: {e}") from e
                masks[i] = resize_mask(mask, size)
                bar.advance(task)
        images.flush()
        masks.flush()
        del images, masks
        index = {"patients": [s.patient for s in slices], "numbers": [s.number for s in slices],
                 "fingerprint": dataset.fingerprint(), "preprocess": dataclasses.asdict(cfg)}
        (tmp / "index.json").write_text(json.dumps(index))
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same cache first; theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
