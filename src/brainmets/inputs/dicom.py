"""DICOM instances of one study -> its series, each ordered along its slice normal, with the channel its tags
suggest and its voxels as a `Scan` in patient coordinates.

    series_of(datasets, limits, warnings) -> [Series], what was passed over
    classify(ds)                          -> the channel a series' tags suggest
    scan(series, max_pixels, to_8bit)     -> the series' voxels with their geometry
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from brainmets.inputs import geometry
from brainmets.inputs.errors import StudyError, StudyTooLarge
from brainmets.inputs.geometry import Scan
from brainmets.inputs.readers import ImageReadError, dicom_slice, dicom_slice_spacing

POSITION_TOLERANCE_MM = 0.01  # two slices closer than this along the normal sit at one position
GAP_FACTOR = 1.5  # a step this many times the usual slice spacing is a gap (missing slices)


def series_of(datasets: Sequence[Dataset], max_slices: int, max_voxels: int,
              warnings: list[str]) -> tuple[list[Series], list[str]]:
    """The image instances grouped by SeriesInstanceUID, each series ordered; and 'uid: why' of each
    instance passed over."""
    ignored, groups = [], {}
    for ds in datasets:
        why = not_an_image(ds)
        if why:
            ignored.append(f"{ds.get('SOPInstanceUID', '?')}: {why}")
        else:
            groups.setdefault(str(ds.get("SeriesInstanceUID", "") or "unknown series"), []).append(ds)
    return [ordered_series(uid, group, max_slices, max_voxels, warnings) for uid, group in groups.items()], ignored


@dataclass
class Series:
    uid: str
    datasets: list[Dataset]  # ordered along the normal
    positions: np.ndarray  # mm along the normal, ascending
    normal: np.ndarray
    guess: str | None
    guessed_by: str
    # ImageOrientationPatient, and the ImagePositionPatient of the first slice; axial at 0 where unknown
    orientation: np.ndarray = field(default_factory=lambda: np.array([1.0, 0, 0, 0, 1, 0]))
    origin: np.ndarray = field(default_factory=lambda: np.zeros(3))
    located: bool = False  # whether its headers place it in patient coordinates (IOP and IPP)

    @property
    def frame(self) -> str | None:
        """FrameOfReferenceUID: series sharing one share patient coordinates (no table move, no re-positioning)."""
        return str(self.first.get("FrameOfReferenceUID", "") or "") or None

    @property
    def first(self) -> Dataset:
        return self.datasets[0]

    @property
    def number(self) -> int | None:
        try:
            return int(self.first.get("SeriesNumber"))
        except (TypeError, ValueError):  # absent, or not a number
            return None

    @property
    def description(self) -> str:
        return str(self.first.get("SeriesDescription", "") or "")

    @property
    def label(self) -> str:
        number = f" {self.number}" if self.number is not None else ""
        return f"series{number} '{self.description}' ({self.uid})"

    @property
    def step(self) -> float | None:
        """mm between slices: from the positions, or for a lone slice its thickness (None if unknown)."""
        if len(self.positions) > 1:
            return float(np.median(np.diff(self.positions)))
        try:
            thickness = float(self.first.get("SpacingBetweenSlices") or self.first.get("SliceThickness") or 0)
        except (TypeError, ValueError):
            return None
        return thickness if 0 < thickness < 1000 else None


def not_an_image(ds: Dataset) -> str:
    """Why an instance is no slice of a grayscale series, or ''."""
    try:
        for _ in ds:  # pydicom converts an element on first access: a broken one fails here, not mid-study
            pass
    except Exception as e:  # any failure of pydicom on these values: an unknown VR, a DS that is no number
        return f"unreadable DICOM header ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if "PixelData" not in ds:
        return f"no pixel data ({ds.get('Modality', 'unknown modality')} object, not an image)"
    try:
        frames, samples = int(ds.get("NumberOfFrames") or 1), int(ds.get("SamplesPerPixel") or 1)
        if int(ds.Rows) < 1 or int(ds.Columns) < 1:
            raise ValueError("no rows or columns")
    except (AttributeError, TypeError, ValueError) as e:  # a tag missing or not a number
        return f"unreadable image header ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if frames > 1:
        return "multi-frame image: send the series as single-frame instances"
    if samples != 1:
        return "colour image: expected a grayscale MR series"
    return ""


def ordered_series(uid: str, datasets: list[Dataset], max_slices: int, max_voxels: int,
                   warnings: list[str]) -> Series:
    """One series as a grid: one size and orientation, distinct positions, sorted along the normal."""
    guess, guessed_by = classify(datasets[0])
    series = Series(uid, datasets, np.zeros(len(datasets)), np.array([0.0, 0.0, 1.0]), guess, guessed_by)
    if len(datasets) > max_slices:
        raise StudyTooLarge(f"{series.label} has {len(datasets):,} slices; the limit is {max_slices:,} "
                            f"per series")
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(sizes) > 1:
        raise StudyError(f"{series.label} mixes slice sizes {', '.join(f'{r}x{c}' for r, c in sorted(sizes))}: "
                         f"a series must be one grid; send each size as its own series")
    rows, columns = sizes.pop()
    spacing = datasets[0].get("PixelSpacing")
    try:
        if spacing is not None and (len(spacing) != 2 or not all(0 < float(v) < 1000 for v in spacing)):
            raise ValueError
    except (TypeError, ValueError):
        raise StudyError(f"{series.label}: PixelSpacing {list(spacing)} is not two positive numbers of mm") from None
    if rows * columns * len(datasets) > max_voxels:
        raise StudyTooLarge(f"{series.label} holds {rows}x{columns}x{len(datasets)} voxels; the limit is "
                            f"{max_voxels:,}")
    try:
        orientations = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in datasets])
        origins = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
        if orientations.shape[1] != 6 or origins.shape[1] != 3 or not np.isfinite(orientations).all() \
                or not np.isfinite(origins).all():
            raise ValueError("not 6 and 3 finite numbers")
    except (AttributeError, TypeError, ValueError):
        if len(datasets) > 1:
            warnings.append(f"{series.label}: no usable ImageOrientationPatient/ImagePositionPatient; slices "
                            f"ordered by InstanceNumber, slice spacing unknown")
        series.datasets = sorted(datasets, key=lambda ds: int(ds.get("InstanceNumber") or 0))
        return series
    row, column = orientations[0, :3], orientations[0, 3:]
    if not (np.isclose(np.linalg.norm(row), 1, atol=1e-3) and np.isclose(np.linalg.norm(column), 1, atol=1e-3)
            and abs(row @ column) < 1e-3):
        raise StudyError(f"{series.label}: ImageOrientationPatient {orientations[0].tolist()} is not two orthogonal "
                          f"unit vectors")
    if not np.allclose(orientations, orientations[0], atol=1e-3):
        raise StudyError(f"{series.label} mixes slice orientations (ImageOrientationPatient differs): a series must "
                         f"be one stack of parallel slices")
    normal = np.cross(orientations[0, :3], orientations[0, 3:])
    positions = origins @ normal
    order = np.argsort(positions, kind="stable")
    series.datasets, series.positions, series.normal = [datasets[i] for i in order], positions[order], normal
    series.orientation, series.origin, series.located = orientations[0], origins[order[0]], True
    steps = np.diff(series.positions)
    for i in np.flatnonzero(steps < POSITION_TOLERANCE_MM):
        raise StudyError(f"{series.label}: two slices at position {series.positions[i]:.2f} mm "
                         f"({series.datasets[i].get('SOPInstanceUID')} and {series.datasets[i + 1].get('SOPInstanceUID')})"
                         f"; a series needs one slice per position (send repeated or multi-echo acquisitions as "
                         f"separate series)")
    if series.step:
        gaps = np.flatnonzero(steps > GAP_FACTOR * series.step)
        if len(gaps):
            warnings.append(f"{series.label}: {len(gaps)} gap(s) in slice positions, e.g. {steps[gaps[0]]:.2f} mm "
                            f"after slice {gaps[0]} where the spacing is {series.step:.2f} mm (missing slices?)")
    return series


def classify(ds: Dataset) -> tuple[str | None, str]:
    """The channel a series' tags suggest: (channel or None, 'description' or 'sequence tags')."""
    text = " ".join(str(ds.get(tag, "") or "") for tag in ("SeriesDescription", "ProtocolName")).upper()
    if re.search(r"FLAIR|DARK.?FLUID", text) and "T1" not in text:  # T1-FLAIR is T1-weighted
        return "flair", "description"
    if re.search(r"T1|MPRAGE|SPGR|BRAVO|\bTFE\b|\bFFE\b", text):
        pre = re.search(r"\bPRE|NON.?CONTRAST|WITHOUT|\bW/?O\b", text)
        post = re.search(r"POST|\+ ?C\b|\bC\+|GAD|\bGD\b|CONTRAST|\bCE\b|\bWITH\b", text)
        contrast = bool(str(ds.get("ContrastBolusAgent", "") or "").strip())
        return ("t1_post" if (post or contrast) and not pre else "t1_pre"), "description"
    scanning = ds.get("ScanningSequence") or []
    scanning = {scanning.upper()} if isinstance(scanning, str) else {str(v).upper() for v in scanning}
    inversion_ir = "IR" in scanning or "TIR" in str(ds.get("SequenceName", "")).upper()
    try:
        long_inversion = float(ds.get("InversionTime") or 0) >= 1500  # FLAIR nulls fluid at TI ~2,000-2,500 ms
    except (TypeError, ValueError):
        long_inversion = False
    if inversion_ir and long_inversion:
        return "flair", "sequence tags"
    return None, ""


def _pixels(ds: Dataset, max_pixels: int, series: Series) -> np.ndarray:
    try:
        return dicom_slice(ds, max_pixels).pixels
    except ImageReadError as e:
        raise type(e)(f"{series.label}, instance {ds.get('SOPInstanceUID')}: {e}") from e




def scan(series: Series, max_pixels: int, to_8bit: Callable[[np.ndarray, str], np.ndarray]) -> Scan:
    """The series' voxels, mapped by `to_8bit`, with the grid its headers give: columns along the first
    ImageOrientationPatient vector, rows along the second, slices along their normal. A series its headers do
    not place gets a unit grid and no frame of reference."""
    voxels = to_8bit(np.stack([_pixels(ds, max_pixels, series) for ds in series.datasets]), series.label)
    pixel_mm = dicom_slice_spacing(series.first)
    rows_mm, columns_mm = pixel_mm or (1.0, 1.0)
    direction = np.column_stack([series.orientation[:3], series.orientation[3:], series.normal])
    return Scan(series.label, geometry.image(voxels, series.origin, (columns_mm, rows_mm, series.step or 1.0),
                                             direction, series.label),
                series.frame if series.located else None)
