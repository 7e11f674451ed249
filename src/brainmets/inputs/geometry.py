"""One series or volume with its grid in patient coordinates, and bringing one onto another's grid.

    Scan            the voxels of a DICOM series or a NIfTI volume as a SimpleITK image: origin, spacing and
                    direction in DICOM's patient coordinates (LPS, mm), with its frame of reference
    axial(scan)     the scan as axial slices the way the networks were trained on them (rows anterior to
                    posterior, columns from the patient's right to left, slices inferior to superior): a
                    permutation and flip of its axes, no resampling, so `from_axial` gives the voxels back
    resample_onto   another scan's voxels on this grid through a transform, with what its field of view covers

Everything geometric is ITK's (SimpleITK): the same images, transforms and interpolators as the registration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from brainmets.inputs.errors import StudyError

AXIAL = "LPS"  # DICOM's axes: the array's columns run to the patient's left, rows to posterior, slices up
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # NIfTI's world is RAS, DICOM's (and ITK's) LPS
ORTHOGONAL_TOLERANCE = 1e-3  # IOP vectors are written with ~6 decimals: allow that much non-orthogonality
SAME_GRID_MM = 0.01  # origins closer than this are one grid (float round-off in the headers)


class GeometryError(StudyError):
    """A header's geometry cannot describe a grid (zero or non-orthogonal axes, a spacing of zero)."""


@dataclass
class Scan:
    label: str  # names the series or file in messages
    image: sitk.Image  # float32, 3-D
    frame: str | None  # FrameOfReferenceUID (DICOM) or the case's (NIfTI); None: unknown

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, columns): the array's shape."""
        return tuple(reversed(self.image.GetSize()))

    def array(self) -> np.ndarray:
        return sitk.GetArrayViewFromImage(self.image)


def image(voxels: np.ndarray, origin, spacing, direction: np.ndarray, label: str) -> sitk.Image:
    """A float32 SimpleITK image of (slices, rows, columns) voxels; `spacing` (columns, rows, slices) mm,
    `direction` the three axes' unit vectors as columns (LPS)."""
    spacing = [float(s) for s in spacing]
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise GeometryError(f"{label}: voxel spacing {spacing} mm: expected positive numbers")
    direction = np.asarray(direction, float)
    if not np.isfinite(direction).all() or not np.allclose(direction.T @ direction, np.eye(3), atol=ORTHOGONAL_TOLERANCE):
        raise GeometryError(f"{label}: orientation {np.round(direction.T, 4).tolist()} is not three orthogonal unit "
                            f"vectors (ImageOrientationPatient or the NIfTI affine)")
    out = sitk.GetImageFromArray(np.ascontiguousarray(voxels, dtype=np.float32))
    out.SetOrigin([float(v) for v in origin])
    out.SetSpacing(spacing)
    out.SetDirection(direction.ravel().tolist())
    return out


def from_nifti_affine(voxels_xyz: np.ndarray, affine: np.ndarray, label: str) -> sitk.Image:
    """A NIfTI volume's (X, Y, Z) voxels with its RAS affine as an LPS image."""
    lps = LPS_FROM_RAS @ np.asarray(affine, float)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if not np.isfinite(lps).all() or np.any(spacing == 0) or abs(np.linalg.det(lps[:3, :3])) < 1e-9:
        raise GeometryError(f"{label}: its affine is singular (voxel axes of zero length or in one plane)")
    return image(np.asarray(voxels_xyz).transpose(2, 1, 0), lps[:3, 3], spacing, lps[:3, :3] / spacing, label)


def nifti_affine(img: sitk.Image) -> np.ndarray:
    """The RAS affine of an image's voxel (column, row, slice) grid: NIfTI's."""
    affine = np.eye(4)
    affine[:3, :3] = np.reshape(img.GetDirection(), (3, 3)) * np.asarray(img.GetSpacing())
    affine[:3, 3] = img.GetOrigin()
    return LPS_FROM_RAS @ affine


def orientation(img: sitk.Image) -> str:
    """The nearest DICOM orientation code of the image's axes, e.g. 'LPS' (axial) or 'PIL' (sagittal)."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(img.GetDirection())


def axial(img: sitk.Image) -> sitk.Image:
    return img if orientation(img) == AXIAL else sitk.DICOMOrient(img, AXIAL)


def from_axial(axial_img: sitk.Image, code: str) -> sitk.Image:
    """`axial`'s inverse: the voxels back in the axis order of an image whose orientation code is `code`."""
    return axial_img if code == AXIAL else sitk.DICOMOrient(axial_img, code)


def is_axial(img: sitk.Image) -> bool:
    """Whether the slices (the third axis) are nearest the patient's inferior-superior axis: an axial or
    oblique axial acquisition, segmented slice by slice as it is."""
    return orientation(img)[2] in "SI"


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """The whole geometry matches: size, spacing, direction and origin."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-4)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=ORTHOGONAL_TOLERANCE)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=SAME_GRID_MM))


def resample_onto(moving: sitk.Image, reference: sitk.Image,
                  transform: sitk.Transform | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`moving` on `reference`'s grid, linearly interpolated: (voxels float32, covered bool), both (slices, rows,
    columns). `transform` maps reference points to moving points (a registration's result); none: the
    geometry alone. Voxels outside `moving`'s field of view are not covered (their value is meaningless)."""
    resampled = sitk.Resample(moving, reference, transform or sitk.Transform(), sitk.sitkLinear, np.nan,
                              sitk.sitkFloat32)
    voxels = sitk.GetArrayFromImage(resampled)
    covered = np.isfinite(voxels)
    voxels[~covered] = 0
    return voxels, covered


def like(voxels: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """(slices, rows, columns) voxels on `reference`'s grid."""
    out = sitk.GetImageFromArray(np.ascontiguousarray(voxels))
    out.CopyInformation(reference)
    return out


def head(voxels: np.ndarray) -> np.ndarray:
    """The voxels inside the head: above a tenth of the bright end (the 99th percentile), where air and
    the noise around the head sit well below it."""
    return voxels > 0.1 * float(np.percentile(voxels, 99))
