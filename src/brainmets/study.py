"""Read a whole study for the engine: DICOM series, one patient's numbered slices, or a NIfTI volume.

    study_from_datasets  pydicom datasets (files, or instances retrieved from a PACS) -> Study
    study_from_files     (name, bytes) pairs: DICOM files, or this dataset's numbered slices -> Study
    study_from_upload    the bytes of a zip or a NIfTI file -> Study
    open_study           a folder, a zip, a NIfTI or a DICOM file on disk -> Study

DICOM instances are grouped by SeriesInstanceUID, ordered by ImagePositionPatient along the slice normal
(from ImageOrientationPatient), and the series are mapped to the model's channels (pre-contrast T1, FLAIR,
post-contrast T1) from SeriesDescription and the sequence tags, or as the caller assigns them. A missing
channel is filled with FLAIR, the dataset's own rule, so a FLAIR-only study works.

Zips are untrusted: entry count, uncompressed total and compression ratio are checked from the directory
before anything is inflated; entries are read into memory, never extracted, so their names (`../x`) are
only labels; nested zips and files of no image format are passed over and listed in `Study.ignored`.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from brainmets.data import MASK_SUFFIX, SLICE_NUMBER, Source, _ignored
from brainmets.readers import (MAX_PIXELS, MAX_VOXELS, RASTER, ImageReadError, UnsupportedFormat, Volume,
                               axial_slices, decode_image, dicom_slice, read_volume, sniff)

CHANNELS = ("t1_pre", "flair", "t1_post")  # the model's input channels, in order
FLAIR = CHANNELS.index("flair")
ZIP_MAGIC = b"PK\x03\x04"
POSITION_TOLERANCE_MM = 0.01  # two slices closer than this along the normal sit at one position
GAP_FACTOR = 1.5  # a step this many times the usual slice spacing is a gap (missing slices)


class StudyError(ValueError):
    """The study cannot be segmented as given; the message says what is wrong and what is accepted."""


class StudyTooLarge(StudyError):
    """Over a limit: slices in a series, voxels, zip entries, uncompressed size or compression ratio."""


@dataclass(frozen=True)
class Limits:
    max_slices: int = 1000  # per series: brain MRI series hold tens to a few hundred slices
    max_entries: int = 10_000  # files in a zip: three series of max_slices, and room for the rest
    max_bytes: int = 2**30  # uncompressed total of what is read
    max_ratio: float = 200.0  # uncompressed / compressed size of an entry; a zip bomb is ~1000
    max_pixels: int = MAX_PIXELS
    max_voxels: int = MAX_VOXELS


RATIO_FLOOR = 2**20  # entries inflating to less than this cannot hurt beyond max_bytes: ratio not checked


@dataclass(frozen=True)
class ChannelSource:
    channel: str  # one of CHANNELS
    series_uid: str | None  # the DICOM series that fills it; None when FLAIR stands in or the input has none
    description: str  # the series' description, or what fills the channel
    how: str  # explicit | description | sequence tags | only series | filled with FLAIR | file


@dataclass(frozen=True)
class SeriesInfo:
    uid: str
    number: int | None
    description: str
    slices: int
    rows: int
    columns: int
    guess: str | None  # the channel its tags suggest, if any
    used_as: str | None  # the channel it fills in this study


@dataclass
class Study:
    name: str
    kind: str  # 'dicom', 'slices' (this dataset's numbered images) or 'nifti'
    slices: list[np.ndarray]  # model input in order, each (H, W, 3) in CHANNELS order, or (H, W)
    spacing: tuple[float, float, float] | None  # mm (between slices, rows, columns), None when unknown
    channels: list[ChannelSource]
    series: list[SeriesInfo] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # 'name: why' of each input passed over
    reference: list[Dataset] = field(default_factory=list, repr=False)  # the FLAIR instances, in slice order
    volume: Volume | None = field(default=None, repr=False)  # NIfTI input: the grid the mask goes back to
    affine: np.ndarray | None = None  # other input: voxel (column, row, slice) -> RAS mm
    files: list[str] = field(default_factory=list)  # numbered slices: the file each slice came from

    def mask_slices(self, nifti: bytes) -> np.ndarray:
        """A mask of this study as NIfTI (`StudyResult.nifti_gz`, or the API's) back in slice order: bool
        (N, H, W), the inverse of `StudyResult.on_grid`."""
        mask = read_volume(nifti)
        if self.volume is not None:
            return np.stack(axial_slices(mask)[0]) > 0
        return np.asarray(mask.data).transpose(2, 1, 0) > 0


# --- DICOM -----------------------------------------------------------------------------------------------


@dataclass
class _Series:
    uid: str
    datasets: list[Dataset]  # ordered along the normal
    positions: np.ndarray  # mm along the normal, ascending
    normal: np.ndarray
    guess: str | None
    guessed_by: str
    # ImageOrientationPatient, and the ImagePositionPatient of the first slice; axial at 0 where unknown
    orientation: np.ndarray = field(default_factory=lambda: np.array([1.0, 0, 0, 0, 1, 0]))
    origin: np.ndarray = field(default_factory=lambda: np.zeros(3))

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


def study_from_datasets(datasets: Sequence[Dataset], channels: Mapping[str, str] | None = None,
                        limits: Limits = Limits(), name: str = "study", ignored: Sequence[str] = ()) -> Study:
    """DICOM instances of one study (any order, any number of series) -> the model's input stack."""
    ignored, images = list(ignored), []
    for ds in datasets:
        why = _not_an_image(ds)
        if why:
            ignored.append(f"{ds.get('SOPInstanceUID', '?')}: {why}")
        else:
            images.append(ds)
    if not images:
        raise StudyError(_nothing_found("no DICOM image", ignored))
    groups: dict[str, list[Dataset]] = {}
    for ds in images:
        groups.setdefault(str(ds.get("SeriesInstanceUID", "") or "unknown series"), []).append(ds)
    warnings: list[str] = []
    series = [_order(uid, group, limits, warnings) for uid, group in groups.items()]
    chosen = _assign(series, channels, warnings)
    flair = chosen[FLAIR][0]
    volumes: dict[str, np.ndarray] = {}
    for s, _ in chosen:
        if s.uid not in volumes:
            volumes[s.uid] = _to_8bit(np.stack([_pixels(ds, limits, s) for ds in s.datasets]), s.label)
    stack = np.stack([volumes[s.uid] for s, _ in chosen], axis=-1)  # (N, H, W, 3)
    first = dicom_slice(flair.first, limits.max_pixels)
    spacing = (flair.step, *first.spacing) if flair.step and first.spacing else None
    filled = [how == "filled with FLAIR" for _, how in chosen]
    used = {id(s): c for c, (s, how) in zip(CHANNELS, chosen) if how != "filled with FLAIR"}
    return Study(
        name=name, kind="dicom", slices=list(stack), spacing=spacing,
        channels=[ChannelSource(c, None, "FLAIR", how) if fill else ChannelSource(c, s.uid, s.description, how)
                  for c, (s, how), fill in zip(CHANNELS, chosen, filled)],
        series=[SeriesInfo(s.uid, s.number, s.description, len(s.datasets), int(s.first.Rows), int(s.first.Columns),
                           s.guess, used.get(id(s))) for s in series],
        warnings=warnings, ignored=ignored, reference=flair.datasets, affine=_affine(flair, first.spacing))


def _not_an_image(ds: Dataset) -> str:
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


def _order(uid: str, datasets: list[Dataset], limits: Limits, warnings: list[str]) -> _Series:
    """One series as a grid: one size and orientation, distinct positions, sorted along the normal."""
    guess, guessed_by = classify(datasets[0])
    series = _Series(uid, datasets, np.zeros(len(datasets)), np.array([0.0, 0.0, 1.0]), guess, guessed_by)
    if len(datasets) > limits.max_slices:
        raise StudyTooLarge(f"{series.label} has {len(datasets):,} slices; the limit is {limits.max_slices:,} "
                            f"per series")
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(sizes) > 1:
        raise StudyError(f"{series.label} mixes slice sizes {', '.join(f'{r}x{c}' for r, c in sorted(sizes))}: "
                         f"a series must be one grid; send each size as its own series")
    rows, columns = sizes.pop()
    if rows * columns * len(datasets) > limits.max_voxels:
        raise StudyTooLarge(f"{series.label} holds {rows}x{columns}x{len(datasets)} voxels; the limit is "
                            f"{limits.max_voxels:,}")
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
    if not np.allclose(orientations, orientations[0], atol=1e-3):
        raise StudyError(f"{series.label} mixes slice orientations (ImageOrientationPatient differs): a series must "
                         f"be one stack of parallel slices")
    normal = np.cross(orientations[0, :3], orientations[0, 3:])
    positions = origins @ normal
    order = np.argsort(positions, kind="stable")
    series.datasets, series.positions, series.normal = [datasets[i] for i in order], positions[order], normal
    series.orientation, series.origin = orientations[0], origins[order[0]]
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
    if abs(normal[2]) < max(abs(normal[0]), abs(normal[1])):
        warnings.append(f"{series.label} is not axial: the models were trained on axial slices")
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


def _assign(series: list[_Series], explicit: Mapping[str, str] | None,
            warnings: list[str]) -> list[tuple[_Series, str]]:
    """(series, how) per channel in CHANNELS order; a channel without a series is FLAIR's."""
    chosen: dict[str, tuple[_Series | None, str]] = {}
    for channel, wanted in (explicit or {}).items():
        if channel not in CHANNELS:
            raise StudyError(f"unknown channel {channel!r} in the assignment; expected {', '.join(CHANNELS)}")
        chosen[channel] = (_find(series, wanted, channel), "explicit") if wanted and wanted.lower() != "none" \
            else (None, "explicit")
    taken = {id(s) for s, _ in chosen.values() if s}
    for channel in CHANNELS:
        if channel in chosen:
            continue
        # Prefer axial over other planes, then more slices, then the earlier series.
        candidates = sorted((s for s in series if s.guess == channel and id(s) not in taken),
                            key=lambda s: (abs(s.normal[2]) < 0.5, -len(s.datasets), s.number or 0))
        if candidates:
            chosen[channel] = candidates[0], candidates[0].guessed_by
            taken.add(id(candidates[0]))
    if chosen.get("flair", (None,))[0] is None:
        if len(series) != 1:
            raise StudyError("no FLAIR series among " + "; ".join(s.label for s in series)
                             + ": say which one is FLAIR (an explicit channel assignment, e.g. flair=<series number,"
                               " description or UID>)")
        chosen["flair"] = series[0], "only series"
        warnings.append(f"{series[0].label} is the only series: segmented as FLAIR")
    flair = chosen["flair"][0]
    out = []
    for channel in CHANNELS:
        s, how = chosen.get(channel, (None, ""))
        if s is not None and s is not flair and not _same_grid(s, flair):
            warnings.append(f"{s.label} is not on the FLAIR series' grid (slices, size or positions differ): "
                            f"FLAIR fills the {channel} channel instead")
            s = None
        out.append((s, how) if s is not None else (flair, "filled with FLAIR"))
    return out


def _find(series: list[_Series], wanted: str, channel: str) -> _Series:
    matches = [s for s in series if wanted in (s.uid, str(s.number)) or wanted.lower() == s.description.lower()]
    if len(matches) != 1:
        problem = "matches no series" if not matches else "matches several series (give the number or UID)"
        raise StudyError(f"{channel}={wanted!r} {problem}; the study holds: " + "; ".join(s.label for s in series))
    return matches[0]


def _same_grid(a: _Series, b: _Series) -> bool:
    if len(a.datasets) != len(b.datasets) or (a.first.Rows, a.first.Columns) != (b.first.Rows, b.first.Columns):
        return False
    tolerance = 0.5 * (b.step or 1.0)
    return bool(np.allclose(a.normal, b.normal, atol=1e-3) and np.allclose(a.positions, b.positions, atol=tolerance))


def _pixels(ds: Dataset, limits: Limits, series: _Series) -> np.ndarray:
    try:
        return dicom_slice(ds, limits.max_pixels).pixels
    except ImageReadError as e:
        raise type(e)(f"{series.label}, instance {ds.get('SOPInstanceUID')}: {e}") from e


def _affine(series: _Series, pixel_spacing: tuple[float, float] | None) -> np.ndarray:
    """Voxel (column, row, slice) -> RAS mm of the series: DICOM's patient axes are LPS."""
    rows_mm, columns_mm = pixel_spacing or (1.0, 1.0)
    lps = np.eye(4)
    lps[:3, 0] = series.orientation[:3] * columns_mm
    lps[:3, 1] = series.orientation[3:] * rows_mm
    lps[:3, 2] = series.normal * (series.step or 1.0)
    lps[:3, 3] = series.origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _to_8bit(channel: np.ndarray, label: str) -> np.ndarray:
    """The training slices are 8-bit, scaled per volume. A series already in integers 0..255 is kept as is;
    any other is scaled from the min-max of the whole series (per slice, the noise of slices outside the head
    would be stretched to full contrast)."""
    channel = channel.astype(np.float32, copy=False)
    if not np.isfinite(channel).all():
        raise StudyError(f"{label} holds NaN or infinite values: expected finite intensities")
    low, high = float(channel.min()), float(channel.max())
    if low >= 0 and high <= 255 and np.array_equal(channel, np.round(channel)):
        return channel.astype(np.uint8)
    if high == low:
        return np.zeros(channel.shape, np.uint8)
    return np.round((channel - low) * (255 / (high - low))).astype(np.uint8)


# --- files, zips, folders ----------------------------------------------------------------------------------


def study_from_files(files: Iterable[tuple[str, bytes]], channels: Mapping[str, str] | None = None,
                     limits: Limits = Limits(), name: str = "study", ignored: Sequence[str] = ()) -> Study:
    """DICOM files of one study, or one patient's numbered slices (`<name>_<n>.tif`, masks passed over)."""
    ignored, dicoms, images = list(ignored), [], []
    for key, data in files:
        # `..` in a name is no hidden file: such names are only labels here, never paths written to.
        if _ignored("/".join(part for part in key.split("/") if part not in ("", ".", ".."))):
            continue
        if data.startswith(ZIP_MAGIC):
            ignored.append(f"{key}: a zip inside the zip, not opened")
            continue
        try:
            kind = sniff(data)
        except ImageReadError:
            ignored.append(f"{key}: neither DICOM nor an image")
            continue
        if kind == "dicom":
            try:
                dicoms.append(pydicom.dcmread(io.BytesIO(data)))
            except Exception as e:  # any failure of the parser on these bytes means a broken file
                ignored.append(f"{key}: unreadable DICOM ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
        elif kind in RASTER and PurePosixPath(key).stem.endswith(MASK_SUFFIX):
            ignored.append(f"{key}: a ground-truth mask")
        elif kind in RASTER:
            images.append((key, data))
        else:
            ignored.append(f"{key}: a NIfTI volume inside a study; send the volume on its own")
    if dicoms:
        ignored += [f"{key}: an image file beside DICOM series" for key, _ in images]
        return study_from_datasets(dicoms, channels, limits, name, ignored)
    if images:
        return _numbered_slices(images, limits, name, ignored, channels)
    raise StudyError(_nothing_found("no DICOM file or image", ignored))


def _numbered_slices(images: list[tuple[str, bytes]], limits: Limits, name: str, ignored: list[str],
                     channels: Mapping[str, str] | None) -> Study:
    """This dataset's layout: `<patient>_<n>.<ext>`, ordered by n; each image's channels in model order."""
    if len(images) > limits.max_slices:
        raise StudyTooLarge(f"{len(images):,} slices; the limit is {limits.max_slices:,} per study")
    warnings = ["channel assignment applies to DICOM series; ignored"] if channels else []
    numbered = []
    for key, data in images:
        match = SLICE_NUMBER.search(PurePosixPath(key).stem)
        numbered.append((int(match.group(1)) if match else -1, key, data))
    numbered.sort(key=lambda item: (item[0], item[1]))
    numbers = [n for n, _, _ in numbered]
    for a, b in zip(numbered, numbered[1:]):
        if a[0] == b[0] >= 0:
            raise StudyError(f"{a[1]} and {b[1]} are both slice {a[0]}: a patient's slices need distinct numbers")
    if -1 in numbers:
        warnings.append("some slice names carry no number (<name>_<n>.<ext>): those are ordered by name")
    elif len(numbers) > 1 and numbers[-1] - numbers[0] + 1 != len(numbers):
        warnings.append(f"slice numbers {numbers[0]}..{numbers[-1]} miss {numbers[-1] - numbers[0] + 1 - len(numbers)}"
                        f" slice(s): a gap in the stack")
    pixels = []
    for _, key, data in numbered:
        try:
            pixels.append(decode_image(data, limits.max_pixels))
        except ImageReadError as e:
            raise type(e)(f"{key}: {e}") from e
        if pixels[-1].shape != pixels[0].shape:
            raise StudyError(f"{key} is {pixels[-1].shape}, {numbered[0][1]} {pixels[0].shape}: one patient's "
                             f"slices must share one size and channel count")
        if pixels[0].shape[0] * pixels[0].shape[1] * len(numbered) > limits.max_voxels:
            raise StudyTooLarge(f"{len(numbered)} slices of {pixels[0].shape[1]}x{pixels[0].shape[0]}; the limit is "
                                f"{limits.max_voxels:,} voxels")
    stack = _channels_8bit(np.stack(pixels), name)
    return Study(name=name, kind="slices", slices=list(stack), spacing=None, channels=_file_channels(stack[0]),
                 warnings=warnings, ignored=ignored, affine=np.diag([-1.0, -1.0, 1.0, 1.0]),
                 files=[key for _, key, _ in numbered])


def _channels_8bit(stack: np.ndarray, label: str) -> np.ndarray:
    """(N, H, W[, C]) with each channel through `_to_8bit`; an alpha channel dropped, as `preprocess` does."""
    if stack.ndim == 3:
        return _to_8bit(stack, label)
    return np.stack([_to_8bit(stack[..., c], label) for c in range(min(stack.shape[-1], 3))], axis=-1)


def _file_channels(image: np.ndarray) -> list[ChannelSource]:
    """Three channels are taken in the model's order (the dataset's); one is FLAIR filling all three."""
    if image.ndim == 3 and image.shape[-1] == 3:
        return [ChannelSource(c, None, f"channel {i} of the images", "file") for i, c in enumerate(CHANNELS)]
    return [ChannelSource(c, None, "the images' one channel" if c == "flair" else "FLAIR",
                          "file" if c == "flair" else "filled with FLAIR") for c in CHANNELS]


def study_from_volume(volume: Volume, name: str = "study") -> Study:
    """A NIfTI volume, sliced along its axis nearest inferior-superior as `predict_volume` does. Intensities
    are left to `preprocess` (per slice), as the page shows a volume's slices and the single-slice route
    segments them."""
    slices, (rows_mm, columns_mm) = axial_slices(volume)
    step = volume.voxel_mm3 / (rows_mm * columns_mm)
    return Study(name=name, kind="nifti", slices=slices, spacing=(step, rows_mm, columns_mm),
                 channels=_file_channels(slices[0]), volume=volume)


def study_from_upload(data: bytes, channels: Mapping[str, str] | None = None, limits: Limits = Limits(),
                      name: str = "study") -> Study:
    """The bytes of a zip (DICOM files, or one patient's numbered slices) or of a NIfTI volume."""
    if data.startswith(ZIP_MAGIC):
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except zipfile.BadZipFile as e:
            raise StudyError(f"broken zip archive ({e})") from e
        return study_from_files(_zip_entries(archive, limits), channels, limits, name)
    try:
        kind = sniff(data)
    except UnsupportedFormat as e:
        raise UnsupportedFormat(f"unsupported study: expected a zip of DICOM files or numbered slices, or a NIfTI "
                                f"volume (.nii, .nii.gz)") from e
    if kind.startswith("nifti"):
        return study_from_volume(read_volume(data, limits.max_voxels), name)
    return study_from_files([(name, data)], channels, limits, name)


def _zip_entries(archive: zipfile.ZipFile, limits: Limits) -> Iterable[tuple[str, bytes]]:
    """Each file entry's (name, bytes), after checking the whole directory; read into memory, never to disk.
    zipfile stops inflating at an entry's declared size and checks its CRC, so the checks below hold."""
    entries = [info for info in archive.infolist() if not info.is_dir()]
    if len(entries) > limits.max_entries:
        raise StudyTooLarge(f"the zip holds {len(entries):,} files; the limit is {limits.max_entries:,}")
    total = sum(info.file_size for info in entries)
    if total > limits.max_bytes:
        raise StudyTooLarge(f"the zip inflates to {total:,} bytes; the limit is {limits.max_bytes:,}")
    for info in entries:
        if info.file_size >= RATIO_FLOOR and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise StudyTooLarge(f"zip entry {info.filename!r} inflates {info.file_size / max(info.compress_size, 1):,.0f}"
                                f"-fold (a zip bomb?); the limit is {limits.max_ratio:g}-fold")
    for info in entries:
        try:
            yield info.filename, archive.read(info)
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError, OSError) as e:
            raise StudyError(f"zip entry {info.filename!r} cannot be read ({e})") from e


def open_study(path: str | Path, channels: Mapping[str, str] | None = None, limits: Limits = Limits()) -> Study:
    """A study on disk: a folder (DICOM files or numbered slices, at any depth), a zip, a NIfTI or DICOM file."""
    path = Path(path)
    if path.is_dir():
        source = Source(path)
        keys = [k for k in source.keys() if not _ignored(k)]
        if len(keys) > limits.max_entries:
            raise StudyTooLarge(f"{path} holds {len(keys):,} files; the limit is {limits.max_entries:,}")
        return study_from_files(((k, source.read(k)) for k in sorted(keys)), channels, limits, path.name)
    if not path.is_file():
        raise StudyError(f"{path}: no such file or folder")
    return study_from_upload(path.read_bytes(), channels, limits, _study_name(path.name))


def _study_name(file_name: str) -> str:
    for ext in (".nii.gz", ".nii", ".zip", ".dcm"):
        if file_name.lower().endswith(ext):
            return file_name[: -len(ext)]
    return file_name


def _nothing_found(what: str, ignored: list[str]) -> str:
    shown = "; ".join(ignored[:5]) + (f"; and {len(ignored) - 5} more" if len(ignored) > 5 else "")
    return (f"{what} found: expected DICOM files of one study, one patient's numbered slices (<name>_<n>.tif), "
            f"or a NIfTI volume" + (f" (passed over: {shown})" if ignored else ""))
