"""Every channel's scan brought onto the FLAIR scan's axial grid, and how each got there.

    align(flair, scans, register) -> Aligned: (N, H, W, 3) uint8 slices on the grid, one Alignment per channel

The grid is FLAIR's own slices when FLAIR is axial (or oblique axial); a sagittal or coronal FLAIR is
reformatted to axial slices (a permutation of its axes; resampled only where its pixels would not be square),
since the networks learned axial slices. Each other scan is

- `same grid`: the whole geometry is FLAIR's (size, spacing, direction, origin) in the same frame of
  reference: its voxels are used as they are;
- `resampled`: through the geometry of its headers onto the grid (linear interpolation);
- `registered`: the same after a rigid registration onto FLAIR undid patient motion the headers do not record.

`register`: 'off' uses the geometry alone. 'auto' (the default) registers every scan that is not on FLAIR's grid,
scans of another (or an unknown) frame of reference from centred volumes, and keeps a registration only where
it improves the similarity measure. A scan on FLAIR's grid in its frame of reference is left in place: on the
aligned studies of the 9 validation patients, registering those too (`on`) changed the mean Dice by less than
0.0001 (benchmarks/grids.py, docs/experiments.md). 'on' registers those too. Where a scan
does not cover a voxel of the grid, FLAIR fills it, as it fills a missing channel.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from brainmets.inputs import geometry
from brainmets.inputs.errors import StudyTooLarge
from brainmets.inputs.geometry import Scan
from brainmets.inputs.registration import register_rigid

REGISTER = ("auto", "on", "off")
LOW_COVERAGE = 0.9  # a channel covering less of FLAIR's head than this is worth a warning


@dataclass(frozen=True)
class Alignment:
    alignment: str  # same grid | resampled | registered | filled with FLAIR
    rotation_deg: float | None = None  # what registration found, when it was kept
    shift_mm: float | None = None
    coverage: float | None = None  # the share of FLAIR's head inside the scan's field of view
    seconds: float = 0.0  # resampling and registration of this channel


@dataclass
class Aligned:
    slices: np.ndarray  # uint8 (N, H, W, 3): the channels on the grid
    grid: sitk.Image  # the slices' grid: FLAIR's axial slices
    reformatted: bool  # the grid is not a permutation of FLAIR's own (masks go back by resampling)
    channels: list[Alignment]
    seconds: dict[str, float]  # resample, register: the whole study's


def check_register(register: str) -> str:
    if register not in REGISTER:
        raise ValueError(f"unknown register setting {register!r}; expected one of {', '.join(REGISTER)}")
    return register


def axial_grid(flair: sitk.Image, max_voxels: int) -> tuple[sitk.Image, bool]:
    """FLAIR as axial slices, and whether that needed resampling (not only a permutation of its axes)."""
    grid = geometry.axial(flair)
    columns_mm, rows_mm, slice_mm = grid.GetSpacing()
    if geometry.is_axial(flair) or np.isclose(columns_mm, rows_mm, rtol=0.01):
        return grid, False
    # A sagittal or coronal series reformatted to axial has its slice spacing along one in-plane axis: the
    # networks would see the head squashed, so the slices get square pixels at the finer of the two spacings.
    pixel = min(columns_mm, rows_mm)
    size = [max(1, round(n * s / pixel)) for n, s in zip(grid.GetSize()[:2], (columns_mm, rows_mm))] + [grid.GetSize()[2]]
    if int(np.prod(size)) > max_voxels:
        raise StudyTooLarge(f"FLAIR reformatted to axial slices of {pixel:.2f} mm would hold {'x'.join(map(str, size))} "
                            f"voxels; the limit is {max_voxels:,}")
    direction = np.reshape(grid.GetDirection(), (3, 3))
    # first voxel centre moves from half the old pixel to half the new one inside the same corner
    origin = (np.asarray(grid.GetOrigin()) - direction[:, 0] * (columns_mm - pixel) / 2
              - direction[:, 1] * (rows_mm - pixel) / 2)
    square = sitk.Image(size, sitk.sitkFloat32)
    square.SetSpacing((pixel, pixel, slice_mm))
    square.SetDirection(grid.GetDirection())
    square.SetOrigin(origin.tolist())
    return sitk.Resample(grid, square, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32), True


def align(flair: Scan, scans: list[Scan | None], register: str, warnings: list[str],
          max_voxels: int) -> Aligned:
    """`scans` per channel (None: FLAIR fills it; FLAIR's own entry is `flair`)."""
    t0 = time.perf_counter()
    grid, reformatted = axial_grid(flair.image, max_voxels)
    flair_voxels = np.round(sitk.GetArrayFromImage(grid)).astype(np.uint8)
    head = geometry.head(flair_voxels)
    seconds = {"resample": time.perf_counter() - t0, "register": 0.0}
    channels, out = [], []
    for scan in scans:
        if scan is None or scan is flair:
            channels.append(Alignment("filled with FLAIR") if scan is None else Alignment("same grid", coverage=1.0))
            out.append(flair_voxels)
            continue
        started = time.perf_counter()
        voxels, covered, alignment = _onto(scan, flair, grid, reformatted, register, warnings, seconds)
        coverage = float(covered[head].mean()) if head.any() else float(covered.mean())
        if coverage < LOW_COVERAGE:
            warnings.append(f"{scan.label} covers {coverage:.0%} of the FLAIR series' head: FLAIR fills the rest of "
                            f"that channel")
        out.append(np.where(covered, np.clip(np.round(voxels), 0, 255), flair_voxels).astype(np.uint8))
        channels.append(Alignment(alignment.alignment, alignment.rotation_deg, alignment.shift_mm, coverage,
                                  time.perf_counter() - started))
    return Aligned(np.stack(out, axis=-1), grid, reformatted, channels, seconds)


def _onto(scan: Scan, flair: Scan, grid: sitk.Image, reformatted: bool, register: str, warnings: list[str],
          seconds: dict[str, float]):
    """One scan on the grid: its voxels, which of them it covers, and how it got there."""
    same_frame = scan.frame is not None and scan.frame == flair.frame
    on_grid = same_frame and geometry.same_grid(scan.image, flair.image)
    if scan.frame is None and flair.frame is None and scan.shape == flair.shape:
        # Neither is placed by its headers: series of one acquisition's size are taken as one grid, as before
        # geometry was read.
        warnings.append(f"{scan.label}: no position or orientation in its headers; taken to be on the FLAIR "
                        f"series' grid (same slice count and size)")
        same_frame = on_grid = True
    transform, found, registered = None, None, False
    if register == "on" or (register == "auto" and not on_grid):
        t0 = time.perf_counter()
        found = register_rigid(flair.image, scan.image, same_frame=same_frame)
        seconds["register"] += time.perf_counter() - t0
        if not same_frame:
            warnings.append(f"{scan.label} is in another frame of reference than FLAIR (or none): its headers' "
                            f"coordinates say nothing about FLAIR's, so it was registered from centred volumes")
        if found.improved:
            transform, registered = found.transform, True
        else:
            warnings.append(f"registration of {scan.label} onto FLAIR did not improve the match ({found.problem}): "
                            f"placed by its headers' geometry" + ("" if same_frame else ", centred on FLAIR's"))
            if not same_frame:
                transform = found.initial  # another frame's coordinates say nothing: the volumes centred
    elif not same_frame and not on_grid:
        warnings.append(f"{scan.label} is in another frame of reference than FLAIR and registration is off: placed "
                        f"by its headers' geometry, which other sessions or scanners do not share")
    t0 = time.perf_counter()
    if on_grid and transform is None and not reformatted:
        voxels = sitk.GetArrayFromImage(geometry.axial(scan.image))
        covered = np.ones(voxels.shape, bool)
    else:
        voxels, covered = geometry.resample_onto(scan.image, grid, transform)
    seconds["resample"] += time.perf_counter() - t0
    if registered:
        return voxels, covered, Alignment("registered", round(found.rotation_deg, 2), round(found.shift_mm, 2))
    as_is = on_grid and transform is None and not reformatted
    return voxels, covered, Alignment("same grid" if as_is else "resampled")

