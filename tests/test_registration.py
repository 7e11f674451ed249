"""Rigid registration onto FLAIR recovers a known motion, on a synthetic head and on a real patient.

A moving image is made as the motion `known` would leave it: `moving(x) = anatomy(known(x))`, so the
registration must find `known`'s inverse, and `known(found(p)) = p` for every point p of the head.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from brainmets.data import open_dataset
from brainmets.inputs.registration import register_rigid

PATIENT = "TCGA_DU_6401_19831001"  # 51 slices, as the timing was measured on


def motion(centre, degrees: float, mm: float, axis=(1.0, 2.0, 0.5), direction=(1.0, -1.0, 1.0)) -> sitk.Euler3DTransform:
    """A rotation of `degrees` about `axis` through `centre`, then a shift of `mm` along `direction`."""
    versor = sitk.VersorRigid3DTransform()
    versor.SetCenter(tuple(centre))
    versor.SetRotation(tuple(np.divide(axis, np.linalg.norm(axis))), math.radians(degrees))
    euler = sitk.Euler3DTransform()
    euler.SetCenter(tuple(centre))
    euler.SetMatrix(versor.GetMatrix())
    euler.SetTranslation(tuple(np.multiply(direction, mm / np.linalg.norm(direction))))
    return euler


def errors(found: sitk.Transform, known: sitk.Transform, points: np.ndarray, shift=(0.0, 0.0, 0.0)) -> tuple[float, float]:
    """(max distance of known(found(p) - shift) from p over `points`, in mm; rotation left over, degrees)."""
    distance = max(np.linalg.norm(np.subtract(known.TransformPoint(tuple(np.subtract(found.TransformPoint(tuple(p)), shift))), p))
                   for p in points)
    left = np.reshape(known.GetMatrix(), (3, 3)) @ np.reshape(found.GetMatrix(), (3, 3))
    return float(distance), math.degrees(math.acos(np.clip((np.trace(left) - 1) / 2, -1, 1)))


def centre_of(image: sitk.Image) -> tuple[float, ...]:
    return image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])


# --- a synthetic head -------------------------------------------------------------------------------------

HEAD_CENTRE = np.array([4.0, -6.0, 3.0])  # off the field of view's centre, as heads are
# (centre offset from the head's, semi-axes in mm, FLAIR-like intensity, T1-like intensity), painted in order:
# scalp, skull, brain, two ventricles of different size, a deep nucleus off the midline, a lesion. T1 inverts
# several of FLAIR's contrasts (nucleus, lesion brighter/darker), so only mutual information sees them alike.
STRUCTURES = (
    ((0, 0, 0), (76, 92, 62), 0.55, 0.85),
    ((0, 0, 0), (71, 87, 57), 0.05, 0.10),
    ((0, 0, 1), (67, 83, 53), 0.45, 0.65),
    ((-9, -5, 8), (7, 22, 12), 0.10, 0.20),
    ((10, -2, 6), (5, 16, 9), 0.10, 0.20),
    ((28, 12, -8), (12, 9, 10), 0.75, 0.40),
    ((-35, 30, 18), (9, 11, 8), 0.95, 0.30),
) + tuple(  # and blobs of tissue throughout the brain: without them the smooth shells leave rotation ill-defined
    (tuple(c), tuple(a), f, t) for c, a, f, t in zip(
        np.random.default_rng(5).uniform((-50, -60, -35), (50, 60, 35), (24, 3)).round(),
        np.random.default_rng(6).uniform(5, 12, (24, 3)).round(),
        np.random.default_rng(7).uniform(0.2, 0.8, 24).round(2), np.random.default_rng(8).uniform(0.2, 0.8, 24).round(2)))
EDGE_MM = 1.5  # edges are sigmoids this wide, so thick slices sample them without aliasing


def anatomy(points: np.ndarray, modality: int) -> np.ndarray:
    """The phantom's intensity (0: FLAIR-like, 1: T1-like) at physical points (N, 3)."""
    value = np.zeros(len(points))
    for offset, axes, *intensity in STRUCTURES:
        q = np.linalg.norm((points - HEAD_CENTRE - offset) / axes, axis=1)
        inside = 1 / (1 + np.exp((q - 1) * min(axes) / EDGE_MM))
        value += inside * (intensity[modality] - value)
    return value


def sampled(modality: int, size, spacing, origin, direction=None,
            known: sitk.Transform | None = None, seed: int = 0) -> sitk.Image:
    """The phantom on a grid, moved by `known` (moving(x) = anatomy(known(x))), with a little noise."""
    image = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    k, j, i = np.meshgrid(*(np.arange(n, dtype=float) for n in size[::-1]), indexing="ij")
    index = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1)
    matrix = np.reshape(image.GetDirection(), (3, 3)) * np.asarray(spacing)
    points = np.asarray(origin) + index @ matrix.T
    if known is not None:
        r, c, t = np.reshape(known.GetMatrix(), (3, 3)), np.asarray(known.GetCenter()), np.asarray(known.GetTranslation())
        points = (points - c) @ r.T + c + t
    values = anatomy(points, modality) + np.random.default_rng(seed).normal(0, 0.02, len(points))
    array = (values.reshape(size[::-1]) * 1000).astype(np.float32)
    moved = sitk.GetImageFromArray(array)
    moved.CopyInformation(image)
    return moved


AXIAL = dict(size=(128, 128, 30), spacing=(1.8, 1.8, 5.0), origin=(-115.0, -115.0, -72.0))  # a clinical axial series
BRAIN_CORNERS = np.array([[x, y, z] for x in (-67, 67) for y in (-83, 83) for z in (-52, 54)]) + HEAD_CENTRE


@pytest.fixture(scope="module")
def flair() -> sitk.Image:
    return sampled(0, **AXIAL)


@pytest.mark.parametrize("degrees, mm", [(3, 2.5), (5, 5)])
def test_recovers_a_known_motion(flair, degrees, mm):
    known = motion(HEAD_CENTRE, degrees, mm)
    result = register_rigid(flair, sampled(1, **AXIAL, known=known, seed=1))
    distance, rotation = errors(result.transform, known, BRAIN_CORNERS)
    assert result.problem == "" and result.improved
    assert distance <= 1.0 and rotation <= 1.0, (distance, rotation)
    assert result.rotation_deg == pytest.approx(degrees, abs=1.0)
    assert result.shift_mm == pytest.approx(mm, abs=1.0)
    assert result.metric_after < result.metric_before


def test_no_motion_finds_next_to_none(flair):
    result = register_rigid(flair, sampled(1, **AXIAL, seed=1))
    assert result.rotation_deg < 0.5 and result.shift_mm < 0.5
    # Whether it improved or not, its transform is as good as the identity.
    assert errors(result.transform, sitk.Euler3DTransform(), BRAIN_CORNERS)[0] <= 1.0


def test_is_deterministic(flair):
    moving = sampled(1, **AXIAL, known=motion(HEAD_CENTRE, 3, 2.5), seed=1)
    first, second = (register_rigid(flair, moving).transform.GetParameters() for _ in range(2))
    np.testing.assert_allclose(first, second, rtol=0, atol=1e-6)  # summation order varies by ~1e-8


@pytest.mark.parametrize("grid", [
    dict(size=(96, 96, 20), spacing=(2.4, 2.4, 7.5), origin=(-114.0, -114.0, -72.0)),  # coarser slices
    # oblique axial: tilted 15 degrees about the left-right axis, finer pixels, 3 mm slices
    dict(size=(144, 144, 40), spacing=(1.6, 1.6, 3.0), origin=(-115.0, -95.0, -85.0),
         direction=(1, 0, 0, 0, math.cos(0.26), -math.sin(0.26), 0, math.sin(0.26), math.cos(0.26))),
])
def test_registers_a_moving_image_on_another_grid(flair, grid):
    known = motion(HEAD_CENTRE, 3, 2.5, axis=(0.3, -1, 1))
    result = register_rigid(flair, sampled(1, **grid, known=known, seed=2))
    distance, rotation = errors(result.transform, known, BRAIN_CORNERS)
    assert result.improved and distance <= 1.0 and rotation <= 1.0, (result.problem, distance, rotation)


def test_other_frame_of_reference_is_centred_first(flair):
    """Another scanner session: the same anatomy, moved, in coordinates 40 mm away."""
    known = motion(HEAD_CENTRE, 4, 3)
    moving = sampled(1, **AXIAL, known=known, seed=3)
    shift = (40.0, -25.0, 15.0)
    moving.SetOrigin(tuple(np.add(moving.GetOrigin(), shift)))
    result = register_rigid(flair, moving, same_frame=False)
    np.testing.assert_allclose(result.initial.GetTranslation(), np.subtract(centre_of(moving), centre_of(flair)))
    distance, rotation = errors(result.transform, known, BRAIN_CORNERS, shift=shift)
    assert result.improved and distance <= 1.0 and rotation <= 1.0, (result.problem, distance, rotation)
    assert result.shift_mm < 10  # measured from the centred start, not from the other frame's origin


def test_noise_is_no_registration(flair):
    noise = sitk.GetImageFromArray(np.random.default_rng(4).uniform(0, 1000, flair.GetSize()[::-1]).astype(np.float32))
    noise.CopyInformation(flair)
    result = register_rigid(flair, noise)
    assert result.problem and not result.improved


def test_constant_image_is_no_registration(flair):
    constant = sitk.Image(flair.GetSize(), sitk.sitkFloat32) + 100.0
    constant.CopyInformation(flair)
    result = register_rigid(flair, constant)
    assert "constant" in result.problem and not result.improved
    assert result.transform.GetParameters() == sitk.Euler3DTransform().GetParameters()


# --- a real patient -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def patient(real_data) -> tuple[sitk.Image, sitk.Image]:
    """(FLAIR, pre-contrast T1) of one patient, its slices stacked at 0.9375 x 0.9375 x 5 mm."""
    dataset = open_dataset(real_data / PATIENT)
    slices = np.stack([dataset.read_image(pair) for pair in dataset.slices]).astype(np.float32)
    images = []
    for channel in (1, 0):
        image = sitk.GetImageFromArray(np.ascontiguousarray(slices[..., channel]))
        image.SetSpacing((0.9375, 0.9375, 5.0))
        image.SetOrigin((-120.0, -120.0, -60.0))
        images.append(image)
    return images[0], images[1]


def head_points(image: sitk.Image) -> np.ndarray:
    """Every 8th voxel in-plane and every 2nd slice inside the head (Otsu), in patient coordinates."""
    k, j, i = np.nonzero(sitk.GetArrayFromImage(sitk.OtsuThreshold(image, 0, 1))[::2, ::8, ::8])
    return np.array([image.TransformContinuousIndexToPhysicalPoint((8.0 * a, 8.0 * b, 2.0 * c)) for a, b, c in zip(i, j, k)])


@pytest.mark.parametrize("degrees, mm", [(0, 0), (3, 2.5), (5, 5)])
def test_real_patient_motion_is_recovered(patient, degrees, mm):
    flair, t1 = patient
    known = motion(centre_of(flair), degrees, mm)
    moving = sitk.Resample(t1, flair, known, sitk.sitkLinear, 0.0)
    result = register_rigid(flair, moving)
    distance, rotation = errors(result.transform, known, head_points(flair))
    # The shipped T1 and FLAIR are themselves aligned to about 0.35 mm at the head's edge (where mutual
    # information peaks with no motion): measured 0.3-0.65 mm here.
    assert distance <= 1.0 and rotation <= 1.0, (distance, rotation)
    if degrees:
        assert result.improved, result.problem
    assert result.seconds < 3.0  # 0.2-0.3 s on 2 cores; generous for a shared machine
