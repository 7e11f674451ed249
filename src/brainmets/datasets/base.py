"""What every case layout shares: a case's files, its study read as serving reads it, its labels on the
study's slices, and which label values form the lesion.

A case's label volume is brought onto the slices' grid (FLAIR's axial grid, `Study.grid`) with nearest
neighbour: on FLAIR's own grid it takes the same path as a mask sent back to the engine (`Study.mask_slices`);
on another grid it is resampled through both headers' geometry. Refused, as disagreeing with the images beyond
what resampling can mend: a label of the FLAIR file's size but another affine (written without its image's
header, e.g. with the identity), and one whose lesion lies more than `OUTSIDE_LIMIT` outside FLAIR's field of
view.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import SimpleITK as sitk

from brainmets.data import DataError, Source
from brainmets.inputs import geometry
from brainmets.inputs.readers import Volume, read_volume
from brainmets.inputs.study import Study

OUTSIDE_LIMIT = 0.05  # share of a label's lesion (in mm³) allowed outside FLAIR's field of view: edge voxels


class CaseError(DataError):
    """One case cannot be used; the message names the case and the file. The other cases go on."""


@dataclass(frozen=True)
class Case:
    id: str  # the patient id of its rows in Arrays and in split.json
    images: tuple[str, ...]  # keys of its image files in the source (NIfTI sequences, or DICOM instances)
    label: str  # key of its label file (a NIfTI volume, or a DICOM SEG)


@dataclass
class CaseSlices:
    study: Study  # as serving reads the same files
    labels: np.ndarray  # int16 (N, H, W): label values on the study's slices
    notes: list[str] = field(default_factory=list)  # e.g. the label resampled onto FLAIR's grid


class CaseDataset:
    """Cases of one layout in a folder or zip. `patients` maps case id -> Case, sorted by id (as
    `data.Dataset.patients`); `skipped` lists 'case (file): why' of what was found but cannot be used."""

    layout = "cases"

    def __init__(self, source: Source, cases: Sequence[Case], skipped: Sequence[str], register: str = "auto"):
        self.source, self.register = source, register
        self.patients = {c.id: c for c in sorted(cases, key=lambda c: c.id)}
        self.skipped = list(skipped)

    @property
    def cases(self) -> list[Case]:
        return list(self.patients.values())

    def describe(self, key: str) -> str:
        return self.source.describe(key)

    def fingerprint(self) -> str:
        """The layout, its reading settings and every file of every case, by name, size and date (a zip's CRC):
        cheap enough for hundreds of cases, so a second run finds its cache at once."""
        h = hashlib.sha1(f"{self.layout}/{self.register}\n".encode())
        for case in self.cases:
            for key in (*case.images, case.label):
                h.update(f"{case.id}/{key}/{signature(self.source, key)}\n".encode())
        return h.hexdigest()[:16]

    def check_labels(self, labels: tuple[int, ...] | None) -> None:
        """Refuse label values the dataset does not declare (nnU-Net's dataset.json); others declare none."""

    def read(self, case: Case) -> CaseSlices:
        raise NotImplementedError


def signature(source: Source, key: str) -> str:
    if source.is_zip:
        return source.signature(key)
    stat = (source.path / key).stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def parse_labels(text: str | None) -> tuple[int, ...] | None:
    """'1,2,3' -> (1, 2, 3); None or '' -> None (every non-zero label)."""
    if not text or not text.strip():
        return None
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"--labels {text!r}: expected label values separated by commas, e.g. 1,2,3") from None
    if not values or values[0] <= 0:
        raise ValueError(f"--labels {text!r}: expected positive label values (0 is the background)")
    return tuple(values)


def describe_labels(labels: tuple[int, ...] | None) -> str:
    return "every non-zero label" if labels is None else "label" + ("s " if len(labels) > 1 else " ") + \
        ", ".join(map(str, labels))


def lesion(labels: np.ndarray, chosen: tuple[int, ...] | None) -> np.ndarray:
    """uint8 0/1: the voxels whose label is one of `chosen` (None: any non-zero label)."""
    return (labels > 0 if chosen is None else np.isin(labels, chosen)).astype(np.uint8)


def label_volume(volume: Volume, where: str) -> sitk.Image:
    """A NIfTI label volume as an image with its geometry; integer values checked."""
    data = np.asarray(volume.data)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CaseError(f"{where}: a label volume of shape {data.shape}; expected one 3-D volume")
    if not np.array_equal(data, np.round(data)) or data.min() < 0:
        raise CaseError(f"{where}: label values must be non-negative integers (found {np.unique(data)[:6].tolist()})")
    return geometry.from_nifti_affine(data.astype(np.float32), volume.affine, where)


def read_label_file(source: Source, key: str) -> sitk.Image:
    try:
        return label_volume(read_volume(source.read(key)), source.describe(key))
    except CaseError:
        raise
    except ValueError as e:  # StudyError, ImageReadError: unreadable or oversized
        raise CaseError(f"{source.describe(key)}: {e}") from e


def onto_slices(study: Study, label: sitk.Image, where: str) -> tuple[np.ndarray, list[str]]:
    """A label volume (with its own geometry) as int16 (N, H, W) on the study's slices, nearest neighbour;
    and notes on what was done."""
    if geometry.same_grid(label, study.source_grid):
        return np.rint(study.from_source_grid(sitk.GetArrayFromImage(label))).astype(np.int16), []
    if label.GetSize() == study.source_grid.GetSize():
        raise CaseError(f"{where}: the size of the FLAIR file's grid ({'x'.join(map(str, label.GetSize()))}) but "
                        f"another affine (origin {_mm(label.GetOrigin())} vs {_mm(study.source_grid.GetOrigin())} mm, "
                        f"spacing {_mm(label.GetSpacing())} vs {_mm(study.source_grid.GetSpacing())} mm): a label "
                        f"written without its image's header? Not resampled: write it with the FLAIR file's affine")
    _check_inside(label, study.grid, where)
    image = sitk.Resample(label, study.grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return np.rint(sitk.GetArrayFromImage(image)).astype(np.int16), [
        f"{where}: on another grid than FLAIR's ({'x'.join(map(str, label.GetSize()))} voxels of "
        f"{'x'.join(f'{s:.3g}' for s in label.GetSpacing())} mm): resampled onto it, nearest neighbour"]


def _check_inside(label: sitk.Image, grid: sitk.Image, where: str) -> None:
    """Refuse a label whose lesion falls outside the slices' field of view: its geometry disagrees with the
    images' (resampling would drop or misplace the lesion)."""
    voxels = np.argwhere(sitk.GetArrayViewFromImage(label) > 0)[:, ::-1]  # (x, y, z) indices of the lesion
    if not len(voxels):
        return
    def to_world(img):
        return np.reshape(img.GetDirection(), (3, 3)) * np.asarray(img.GetSpacing()), np.asarray(img.GetOrigin())
    matrix, origin = to_world(label)
    points = voxels @ matrix.T + origin
    g_matrix, g_origin = to_world(grid)
    index = (points - g_origin) @ np.linalg.inv(g_matrix).T
    inside = np.all((index >= -0.5) & (index <= np.asarray(grid.GetSize()) - 0.5), axis=1)
    outside = 1 - float(inside.mean())
    if outside > OUTSIDE_LIMIT:
        raise CaseError(f"{where}: {outside:.0%} of its labelled voxels lie outside FLAIR's field of view: the "
                        f"label's shape or affine disagrees with the images' (expected the FLAIR file's grid, or "
                        f"one covering the same head)")


def stem(key: str) -> str | None:
    """A NIfTI file's name without .nii / .nii.gz; None for other files."""
    name = PurePosixPath(key).name
    for ending in (".nii.gz", ".nii"):
        if name.lower().endswith(ending):
            return name[:-len(ending)]
    return None


def _mm(values) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"
