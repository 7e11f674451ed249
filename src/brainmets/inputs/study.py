"""Read a whole study for the engine: DICOM series, one patient's numbered slices, a NIfTI case or volume.

    study_from_datasets  pydicom datasets (files, or instances retrieved from a PACS) -> Study
    study_from_files     (name, bytes) pairs: DICOM files, this dataset's numbered slices, a case's NIfTI files
    study_from_upload    the bytes of a zip or a NIfTI file -> Study
    open_study           a folder, a zip, a NIfTI or a DICOM file on disk -> Study

DICOM instances are grouped by SeriesInstanceUID, ordered by ImagePositionPatient along the slice normal
(`brainmets.inputs.dicom`), and the series are mapped to the model's channels (pre-contrast T1, FLAIR,
post-contrast T1) from SeriesDescription and the sequence tags, or as the caller assigns them; a case's NIfTI
files by their names (`brainmets.inputs.cases`). A missing channel is filled with FLAIR, the dataset's own
rule, so a FLAIR-only study works. Every sequence is scaled to 8 bits over its whole volume (as the training
slices were), then brought onto FLAIR's grid (`brainmets.inputs.align`): each channel says how.

Zips are untrusted: entry count, uncompressed total and compression ratio are checked from the directory
before anything is inflated; entries are read into memory, never extracted, so their names (`../x`) are
only labels; nested zips and files of no image format are passed over and listed in `Study.ignored`.
"""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset

from brainmets.data import MASK_SUFFIX, SLICE_NUMBER, Source
from brainmets.data import ignored as ignored_name  # `ignored` here is the list of what was passed over
from brainmets.inputs import cases, dicom, geometry
from brainmets.inputs.align import Aligned, align, check_register
from brainmets.inputs.dicom import Series
from brainmets.inputs.errors import StudyError, StudyTooLarge
from brainmets.inputs.geometry import Scan
from brainmets.inputs.readers import (MAX_PIXELS, MAX_VOXELS, RASTER, ImageReadError, UnsupportedFormat, Volume,
                                      decode_image, dicom_slice_spacing, read_volume, sniff)

CHANNELS = ("t1_pre", "flair", "t1_post")  # the model's input channels, in order
FLAIR = CHANNELS.index("flair")
ZIP_MAGIC = b"PK\x03\x04"
# A case's grid, in order of preference: FLAIR, else a T1 stands in for it (as a lone DICOM series does).
FLAIR_STAND_INS = ("flair", "t1_post", "t1_pre")


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
    description: str  # the series' description or file's name, or what fills the channel
    how: str  # how it was chosen: explicit | description | sequence tags | only series | file | a case's naming
    alignment: str = "same grid"  # how it reached FLAIR's grid: same grid | resampled | registered | filled with FLAIR
    rotation_deg: float | None = None  # registered: the rotation and shift registration found
    shift_mm: float | None = None
    coverage: float | None = None  # the share of FLAIR's head inside its field of view
    seconds: float = 0.0  # its resampling and registration


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
    kind: str  # 'dicom', 'slices' (this dataset's numbered images), 'nifti' (a volume) or 'nifti case'
    slices: list[np.ndarray]  # model input in order, each (H, W, 3) in CHANNELS order, on `grid`
    spacing: tuple[float, float, float] | None  # mm (between slices, rows, columns), None when unknown
    channels: list[ChannelSource]
    grid: sitk.Image = field(repr=False)  # the slices' grid: FLAIR's, as axial slices
    source_grid: sitk.Image = field(repr=False)  # FLAIR's own grid, where masks go back to
    reformatted: bool = False  # `grid` was resampled from FLAIR's (not only its axes permuted)
    series: list[SeriesInfo] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # 'name: why' of each input passed over
    reference: list[Dataset] = field(default_factory=list, repr=False)  # the FLAIR instances, in slice order
    volume: Volume | None = field(default=None, repr=False)  # NIfTI input: FLAIR's file, whose header the mask keeps
    files: list[str] = field(default_factory=list)  # numbered slices: the file each slice came from
    seconds: dict[str, float] = field(default_factory=dict)  # read, resample, register
    register: str = "auto"  # the registration setting it was read with: part of a mask's model version

    def on_source_grid(self, mask: np.ndarray) -> np.ndarray:
        """A (N, H, W) mask of the slices on FLAIR's own grid, (slices, rows, columns) of its series or file:
        the instances a DICOM SEG references, the voxels of a NIfTI."""
        image = geometry.like(np.asarray(mask, np.uint8), self.grid)
        if self.reformatted:
            image = sitk.Resample(image, self.source_grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        else:
            image = geometry.from_axial(image, geometry.orientation(self.source_grid))
        return sitk.GetArrayFromImage(image)

    def source_affine(self) -> np.ndarray:
        """Voxel (column, row, slice) of FLAIR's own grid -> RAS mm: the mask NIfTI's affine."""
        return self.volume.affine if self.volume is not None else geometry.nifti_affine(self.source_grid)

    def from_source_grid(self, voxels: np.ndarray) -> np.ndarray:
        """(slices, rows, columns) voxels on FLAIR's own grid (a mask, a label volume) on the slices' grid,
        nearest neighbour where FLAIR was resampled: (N, H, W), the inverse of `on_source_grid`."""
        image = geometry.like(np.asarray(voxels), self.source_grid)
        if self.reformatted:
            image = sitk.Resample(image, self.grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        else:
            image = geometry.axial(image)
        return sitk.GetArrayFromImage(image)

    def mask_slices(self, nifti: bytes) -> np.ndarray:
        """A mask of this study as NIfTI (`StudyResult.nifti_gz`, or the API's) back on the slices' grid: bool
        (N, H, W)."""
        return self.from_source_grid(np.asarray(read_volume(nifti).data).transpose(2, 1, 0).astype(np.uint8)) > 0


# --- DICOM -----------------------------------------------------------------------------------------------


def study_from_datasets(datasets: Sequence[Dataset], channels: Mapping[str, str] | None = None,
                        limits: Limits = Limits(), name: str = "study", ignored: Sequence[str] = (),
                        register: str = "auto") -> Study:
    """DICOM instances of one study (any order, any number of series) -> the model's input stack, every series
    on the FLAIR series' grid (`brainmets.inputs.align`)."""
    register = check_register(register)
    t0 = time.perf_counter()
    warnings: list[str] = []
    series, passed = dicom.series_of(datasets, limits.max_slices, limits.max_voxels, warnings)
    ignored = list(ignored) + passed
    if not series:
        raise StudyError(_nothing_found("no DICOM image", ignored))
    chosen = _assign(series, channels, warnings)
    flair = chosen[FLAIR][0]
    scans: dict[str, Scan] = {}
    for s, _ in chosen:
        if s is not None and s.uid not in scans:
            scans[s.uid] = dicom.scan(s, limits.max_pixels, _to_8bit)
    read_s = time.perf_counter() - t0
    aligned = align(scans[flair.uid], [scans[s.uid] if s else None for s, _ in chosen], register, warnings,
                    limits.max_voxels)
    pixel_mm = dicom_slice_spacing(flair.first)
    used = {id(s): c for c, (s, _) in zip(CHANNELS, chosen) if s is not None}
    sources = [ChannelSource(c, None, "FLAIR", how) if s is None else ChannelSource(c, s.uid, s.description, how)
               for c, (s, how) in zip(CHANNELS, chosen)]
    return _study(name, "dicom", aligned, sources, scans[flair.uid].image, known_spacing=bool(flair.step and pixel_mm),
                  read_s=read_s, warnings=warnings, ignored=ignored, reference=flair.datasets, register=register,
                  series=[SeriesInfo(s.uid, s.number, s.description, len(s.datasets), int(s.first.Rows),
                                     int(s.first.Columns), s.guess, used.get(id(s))) for s in series])


def _study(name: str, kind: str, aligned: Aligned, sources: list[ChannelSource], source_grid: sitk.Image,
           known_spacing: bool, read_s: float, **fields) -> Study:
    """A Study of aligned channels: each ChannelSource completed with how it reached the grid."""
    channels = [ChannelSource(c.channel, c.series_uid, c.description, c.how, a.alignment, a.rotation_deg, a.shift_mm,
                              a.coverage, round(a.seconds, 4))
                for c, a in zip(sources, aligned.channels)]
    spacing = tuple(float(v) for v in reversed(aligned.grid.GetSpacing())) if known_spacing else None
    return Study(name=name, kind=kind, slices=list(aligned.slices), spacing=spacing, channels=channels,
                 grid=aligned.grid, source_grid=source_grid, reformatted=aligned.reformatted,
                 seconds={"read": round(read_s, 4), **{k: round(v, 4) for k, v in aligned.seconds.items()}}, **fields)


def _assign(series: list[Series], explicit: Mapping[str, str] | None,
            warnings: list[str]) -> list[tuple[Series | None, str]]:
    """(series, how) per channel in CHANNELS order; (None, 'filled with FLAIR') for a channel without one."""
    chosen: dict[str, tuple[Series | None, str]] = {}
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
    return [chosen[c] if chosen.get(c, (None,))[0] is not None else (None, "filled with FLAIR") for c in CHANNELS]


def _find(series: list[Series], wanted: str, channel: str) -> Series:
    matches = [s for s in series if wanted in (s.uid, str(s.number)) or wanted.lower() == s.description.lower()]
    if len(matches) != 1:
        problem = "matches no series" if not matches else "matches several series (give the number or UID)"
        raise StudyError(f"{channel}={wanted!r} {problem}; the study holds: " + "; ".join(s.label for s in series))
    return matches[0]


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
                     limits: Limits = Limits(), name: str = "study", ignored: Sequence[str] = (),
                     register: str = "auto", channel_names: Sequence[str] | None = None) -> Study:
    """DICOM files of one study, one patient's numbered slices (`<name>_<n>.tif`, masks passed over), or one
    case's NIfTI files (BraTS or nnU-Net names, `brainmets.inputs.cases`; the nnU-Net channel order from a
    `dataset.json` among the files, else `channel_names`)."""
    check_register(register)  # before any file is read
    ignored, dicoms, images, volumes, descriptions = list(ignored), [], [], [], []
    for key, data in files:
        # `..` in a name is no hidden file: such names are only labels here, never paths written to.
        if ignored_name("/".join(part for part in key.split("/") if part not in ("", ".", ".."))):
            continue
        if PurePosixPath(key).name == "dataset.json":
            descriptions.append((key, data))
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
            volumes.append((key, data))
    if dicoms:
        ignored += [f"{key}: an image file beside DICOM series" for key, _ in images + volumes]
        return study_from_datasets(dicoms, channels, limits, name, ignored, register)
    if volumes:
        ignored += [f"{key}: an image file beside NIfTI volumes" for key, _ in images]
        return _nifti_files(volumes, descriptions, channel_names, limits, name, ignored, register)
    if images:
        return _numbered_slices(images, limits, name, ignored, channels, register)
    raise StudyError(_nothing_found("no DICOM file or image", ignored))


def _numbered_slices(images: list[tuple[str, bytes]], limits: Limits, name: str, ignored: list[str],
                     channels: Mapping[str, str] | None, register: str) -> Study:
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
    grid = geometry.image(np.zeros(stack.shape[:3], np.float32), (0, 0, 0), (1, 1, 1), np.eye(3), name)  # unknown
    return Study(name=name, kind="slices", slices=list(stack), spacing=None, channels=_file_channels(stack[0]),
                 grid=grid, source_grid=grid, warnings=warnings, ignored=ignored, files=[key for _, key, _ in numbered],
                 register=register)


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


def study_from_volume(volume: Volume, name: str = "study", register: str = "auto") -> Study:
    """A NIfTI volume: one sequence (FLAIR, filling the other channels) or three in the model's channel order
    (a 4-D volume), each scaled to 8 bits over the whole volume as DICOM series are."""
    t0 = time.perf_counter()
    channels = [volume.data] if volume.data.ndim == 3 else [volume.data[..., c] for c in range(volume.data.shape[3])]
    scans = [Scan(name, geometry.from_nifti_affine(_to_8bit(np.asarray(c), name), volume.affine, name), name)
             for c in channels]
    flair = scans[FLAIR] if len(scans) == 3 else scans[0]
    warnings: list[str] = []
    aligned = align(flair, scans if len(scans) == 3 else [None, flair, None], check_register(register), warnings,
                    MAX_VOXELS)
    sources = [ChannelSource(c, None, f"channel {i} of the volume", "file") for i, c in enumerate(CHANNELS)] \
        if len(scans) == 3 else [ChannelSource(c, None, name if c == "flair" else "FLAIR",
                                               "file" if c == "flair" else "filled with FLAIR") for c in CHANNELS]
    return _study(name, "nifti", aligned, sources, flair.image, known_spacing=True, read_s=time.perf_counter() - t0,
                  warnings=warnings, volume=volume, register=register)


def _nifti_files(volumes: list[tuple[str, bytes]], descriptions: list[tuple[str, bytes]],
                 channel_names: Sequence[str] | None, limits: Limits, name: str, ignored: list[str],
                 register: str) -> Study:
    """One case's NIfTI files, each sequence on its own grid, brought onto FLAIR's through their affines (one
    scanner session: one frame of reference); or a lone volume."""
    t0 = time.perf_counter()
    if len(descriptions) > 1:
        raise StudyError(f"{len(descriptions)} dataset.json files ({', '.join(k for k, _ in descriptions)}): send one")
    channels_from = "the channel names given"
    if descriptions:
        key, data = descriptions[0]
        channel_names, channels_from = list(cases.read_dataset_json(data, key)["channel_names"].values()), key
    found, passed = cases.find_cases([key for key, _ in volumes], channel_names, channels_from)
    ignored += passed
    if not found:
        if len(volumes) == 1:
            key, data = volumes[0]
            study = study_from_volume(read_volume(data, limits.max_voxels), name, register)
            study.ignored = ignored
            return study
        raise StudyError(f"{len(volumes)} NIfTI volumes that name no case's sequences (BraTS: <case>-t2f.nii.gz or "
                         f"<case>_flair.nii.gz; nnU-Net: <case>_0000.nii.gz with a dataset.json): "
                         + ", ".join(k for k, _ in volumes[:5]))
    if len(found) > 1:
        raise StudyError(f"{len(found)} cases in one study ({', '.join(c.case for c in found[:5])}): send one case "
                         f"(`brainmets predict` takes a folder of many)")
    case, data = found[0], dict(volumes)
    warnings: list[str] = []
    reference = next((seq for seq in FLAIR_STAND_INS if seq in case.files), None)
    if reference is None:
        raise StudyError(f"case {case.case} has neither FLAIR nor a T1 to stand in for it (found: "
                         f"{', '.join(case.files) or 'nothing'})")
    if reference != "flair":
        warnings.append(f"case {case.case} has no FLAIR: {case.files[reference]} stands in for it")
    read = {sequence: read_volume(data[key], limits.max_voxels) for sequence, key in case.files.items()
            if sequence in CHANNELS}
    scans = {}
    for sequence, volume in read.items():
        key = case.files[sequence]
        if volume.data.ndim != 3:
            raise StudyError(f"{key}: a 4-D volume in a case folder; expected one 3-D volume per sequence")
        scans[sequence] = Scan(key, geometry.from_nifti_affine(_to_8bit(np.asarray(volume.data), key), volume.affine,
                                                               key), f"case {case.case}")
    read_s = time.perf_counter() - t0
    scans.setdefault("flair", scans[reference])
    aligned = align(scans["flair"], [scans.get(c) for c in CHANNELS], check_register(register), warnings,
                    limits.max_voxels)
    named = {c: reference if c == "flair" else c for c in CHANNELS}  # the file each channel came from
    sources = [ChannelSource(c, None, case.files[named[c]], case.how[named[c]]) if c in scans
               else ChannelSource(c, None, "FLAIR", "filled with FLAIR") for c in CHANNELS]
    if "t2" in case.files:
        ignored.append(f"{case.files['t2']}: T2, read as part of the case but not used by the models")
    return _study(case.case, "nifti case", aligned, sources, scans["flair"].image, known_spacing=True, read_s=read_s,
                  warnings=warnings, ignored=ignored, volume=read[reference], register=register)


def study_from_upload(data: bytes, channels: Mapping[str, str] | None = None, limits: Limits = Limits(),
                      name: str = "study", register: str = "auto", channel_names: Sequence[str] | None = None) -> Study:
    """The bytes of a zip (DICOM files, one patient's numbered slices, or one case's NIfTI files) or of a
    NIfTI volume."""
    check_register(register)  # before any work
    if data.startswith(ZIP_MAGIC):
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except zipfile.BadZipFile as e:
            raise StudyError(f"broken zip archive ({e})") from e
        return study_from_files(_zip_entries(archive, limits), channels, limits, name, register=register,
                                channel_names=channel_names)
    try:
        kind = sniff(data)
    except UnsupportedFormat as e:
        raise UnsupportedFormat("unsupported study: expected a zip of DICOM files, numbered slices or a case's NIfTI "
                                "files, or a NIfTI volume (.nii, .nii.gz)") from e
    if kind.startswith("nifti"):
        return study_from_volume(read_volume(data, limits.max_voxels), name, register)
    return study_from_files([(name, data)], channels, limits, name, register=register)


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


def open_study(path: str | Path, channels: Mapping[str, str] | None = None, limits: Limits = Limits(),
               register: str = "auto", channel_names: Sequence[str] | None = None) -> Study:
    """A study on disk: a folder (DICOM files, numbered slices or a case's NIfTI files, at any depth), a zip, a
    NIfTI or DICOM file. A case folder's nnU-Net `dataset.json` may lie one level up."""
    check_register(register)
    path = Path(path)
    if path.is_dir():
        source = Source(path)
        keys = [k for k in source.keys() if not ignored_name(k)]
        if len(keys) > limits.max_entries:
            raise StudyTooLarge(f"{path} holds {len(keys):,} files; the limit is {limits.max_entries:,}")
        files = [(k, source.read(k)) for k in sorted(keys)]
        above = path.parent / "dataset.json"
        if above.is_file() and not any(PurePosixPath(k).name == "dataset.json" for k in keys):
            files.append(("../dataset.json", above.read_bytes()))
        return study_from_files(files, channels, limits, path.name, register=register, channel_names=channel_names)
    if not path.is_file():
        raise StudyError(f"{path}: no such file or folder")
    return study_from_upload(path.read_bytes(), channels, limits, _study_name(path.name), register, channel_names)


def _study_name(file_name: str) -> str:
    for ext in (".nii.gz", ".nii", ".zip", ".dcm"):
        if file_name.lower().endswith(ext):
            return file_name[: -len(ext)]
    return file_name


def _nothing_found(what: str, ignored: list[str]) -> str:
    shown = "; ".join(ignored[:5]) + (f"; and {len(ignored) - 5} more" if len(ignored) > 5 else "")
    return (f"{what} found: expected DICOM files of one study, one patient's numbered slices (<name>_<n>.tif), "
            f"or a NIfTI volume" + (f" (passed over: {shown})" if ignored else ""))
