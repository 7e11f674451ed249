"""Preprocessed arrays of a dataset, decoded once and memory-mapped thereafter.

Keyed by the dataset's fingerprint and the preprocessing settings (for a case layout, `brainmets.datasets`,
also its layout and the labels forming the lesion), under `$BRAINMETS_CACHE` (default `~/.cache/brainmets`).
Written to a temporary folder and renamed into place, so a crash never leaves a half-written cache that a
later run would trust. A case that cannot be read is skipped with its reason (`Arrays.skipped`), the others
go on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.progress import Progress

from brainmets.config import PreprocessConfig
from brainmets.data import DataError, Dataset
from brainmets.datasets.base import Case, CaseDataset, CaseSlices, lesion
from brainmets.preprocessing import enhance, resize_mask

CACHE_VERSION = 1


@dataclass
class Arrays:
    images: np.ndarray  # uint8 (N, S, S, 3): enhance() of every slice
    masks: np.ndarray  # uint8 (N, S, S), 0/1
    patients: list[str]  # patient of each row; rows of a patient are contiguous, in slice order
    numbers: list[int]
    skipped: list[str] = field(default_factory=list)  # case layouts: 'case (file): why' of each case left out
    notes: list[str] = field(default_factory=list)  # case layouts: e.g. a label file resampled onto FLAIR's grid

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


def preprocessed(dataset: Dataset | CaseDataset, cfg: PreprocessConfig, root: Path | None = None,
                 progress: bool = True, labels: tuple[int, ...] | None = None) -> Arrays:
    """The dataset's arrays, from the cache or built (and cached) now. `labels`: a case layout's label values
    forming the lesion (None: every non-zero one); the reference layout's masks are binary already."""
    if isinstance(dataset, CaseDataset):
        return _cases(dataset, cfg, labels, root or cache_root(), progress)
    folder = (root or cache_root()) / _key(dataset, cfg)
    if not (folder / "index.json").exists():
        _build(dataset, cfg, folder, progress)
    index = json.loads((folder / "index.json").read_text())
    return Arrays(
        images=np.load(folder / "images.npy", mmap_mode="r"),
        masks=np.load(folder / "masks.npy", mmap_mode="r"),
        patients=index["patients"], numbers=index["numbers"],
    )


@contextmanager
def _publishing(folder: Path) -> Iterator[tuple[Path, dict]]:
    """A temporary folder to build a cache in and the index to fill; on success the index is written and the
    folder renamed into place, so a crash never leaves a half-written cache that a later run would trust."""
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    index: dict = {}
    try:
        yield tmp, index
        (tmp / "index.json").write_text(json.dumps(index))
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same cache first; theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build(dataset: Dataset, cfg: PreprocessConfig, folder: Path, progress: bool) -> None:
    slices = dataset.slices
    size = cfg.image_size
    with _publishing(folder) as (tmp, index):
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
        index.update(patients=[s.patient for s in slices], numbers=[s.number for s in slices],
                     fingerprint=dataset.fingerprint(), preprocess=dataclasses.asdict(cfg))


# --- case layouts (brainmets.datasets) ------------------------------------------------------------------------


def case_arrays(read: CaseSlices, labels: tuple[int, ...] | None,
                cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """One case's rows: `enhance` of each of its study's slices, as serving preprocesses them, and its lesion
    mask resized as the reference layout's masks are."""
    images = np.stack([enhance(s, cfg) for s in read.study.slices])
    masks = np.stack([resize_mask(np.ascontiguousarray(lesion(m, labels)), cfg.image_size) for m in read.labels])
    return images, masks


def _case_key(dataset: CaseDataset, cfg: PreprocessConfig, labels: tuple[int, ...] | None) -> str:
    settings = json.dumps([CACHE_VERSION, dataset.layout, dataset.fingerprint(), list(labels) if labels else None,
                           dataclasses.asdict(cfg)], sort_keys=True)
    return hashlib.sha1(settings.encode()).hexdigest()[:20]


def _cases(dataset: CaseDataset, cfg: PreprocessConfig, labels: tuple[int, ...] | None, root: Path,
           progress: bool) -> Arrays:
    dataset.check_labels(labels)
    folder = root / _case_key(dataset, cfg, labels)
    if not (folder / "index.json").exists():
        _build_cases(dataset, cfg, labels, folder, progress)
    index = json.loads((folder / "index.json").read_text())
    return Arrays(images=np.load(folder / "images.npy", mmap_mode="r"),
                  masks=np.load(folder / "masks.npy", mmap_mode="r"), patients=index["patients"],
                  numbers=index["numbers"], skipped=index["skipped"], notes=index["notes"])


def _why(dataset: CaseDataset, case: Case, error: Exception) -> str:
    """The error naming its case and file."""
    text = str(error)
    if text.startswith(f"case {case.id}"):
        return text
    return f"case {case.id} ({dataset.describe(case.images[0])}): {text}"


def _build_cases(dataset: CaseDataset, cfg: PreprocessConfig, labels: tuple[int, ...] | None, folder: Path,
                 progress: bool) -> None:
    """Each case read, preprocessed and set aside in a part file (hundreds of cases need not fit in memory),
    then the parts joined into the two arrays."""
    with _publishing(folder) as (tmp, index):
        patients, numbers, counts, notes, skipped = [], [], [], [], list(dataset.skipped)
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task(f"reading {dataset.layout} cases", total=len(dataset.cases))
            for case in dataset.cases:
                bar.update(task, description=f"reading {dataset.layout} case {case.id}")
                try:
                    read = dataset.read(case)
                    images, masks = case_arrays(read, labels, cfg)
                except (ValueError, OSError, RuntimeError) as e:  # the study's, the label's or ITK's refusal
                    skipped.append(_why(dataset, case, e))
                else:
                    np.save(tmp / f"part{len(counts)}-images.npy", images)
                    np.save(tmp / f"part{len(counts)}-masks.npy", masks)
                    counts.append(len(images))
                    patients += [case.id] * len(images)
                    numbers += list(range(1, len(images) + 1))
                    notes += read.notes
                bar.advance(task)
        if not counts:
            raise DataError(f"no case of {dataset.source.path} could be read: " + "; ".join(skipped[:5]))
        size = cfg.image_size
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, (len(patients), size, size, 3))
        masks = np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.uint8, (len(patients), size, size))
        start = 0
        for i, n in enumerate(counts):
            for name, out in (("images", images), ("masks", masks)):
                out[start:start + n] = np.load(tmp / f"part{i}-{name}.npy")
                (tmp / f"part{i}-{name}.npy").unlink()
            start += n
        images.flush()
        masks.flush()
        del images, masks
        index.update(patients=patients, numbers=numbers, skipped=skipped, notes=notes, layout=dataset.layout,
                     labels=list(labels) if labels else None, fingerprint=dataset.fingerprint(),
                     preprocess=dataclasses.asdict(cfg))
