"""Rigid registration of one MR sequence onto FLAIR: undo patient motion that no DICOM tag records.

    result = register_rigid(flair, t1)          # both sitk float32 images with their real geometry
    if result.improved:
        t1_on_flair = sitk.Resample(t1, flair, result.transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)

Method: a 6-parameter `Euler3DTransform` about the centre of FLAIR's head, Mattes mutual information
(FLAIR against T1 is multi-modal), two resolutions, regular-step gradient descent with parameter scales
from the physical shift each parameter causes. It starts from the geometry: identity in patient
coordinates when both series share a frame of reference, else the two volumes' centres aligned (what
`CenteredTransformInitializer`'s GEOMETRY mode does).

Where the time goes, and what was tuned (measured on the shared dataset's 51-slice, 256x256 study at
0.94 x 0.94 x 5 mm, T1 and post-contrast T1 moved 3-5 degrees and 2.5-5 mm about random axes, on 2 cores
of an Intel Xeon (Sapphire Rapids, model 167) shared with other jobs):

- ImageRegistrationMethod's own pyramid smooths and shrinks the full-resolution images at every level: that
  alone took 0.35 s of a 0.5 s run, and it can only shrink every axis alike, which turns 5 mm slices into
  10-20 mm ones. Here each level is a separate run on images averaged down per axis (`BinShrink`) to about
  4 mm and 2 mm voxels, keeping thick slices as they are: 0.02 s for both levels.
- Only FLAIR's box around the head is registered: parameter scales then follow the head's size, not the
  field of view's, and rotations no longer stop up to 0.6 degrees short.
- The metric's cost is its samples, not the image size: random samples (seeded, so a result is
  reproducible), drawn only inside the head (an Otsu mask of FLAIR), 5,000 at 4 mm and 20,000 at 2 mm.
  The moving image's gradient is taken at the samples instead of filtering the whole image per level.
- 16 histogram bins at 4 mm, 32 at 2 mm: 32 bins over 5,000 samples left the joint histogram so noisy
  that 2 of 12 moved series stopped 15 mm off at the coarse level.
- The optimizer shortens its step by 0.8 (not ITK's 0.5) each time the gradient turns back: with 0.5 noisy
  first steps left it crawling at 0.05 mm per iteration far from the optimum; 0.8 halved the synthetic
  head's worst error (1.5 -> 0.7 mm) for 0.05 s more.
- One thread: two were no faster here, and the other core can register the other series meanwhile.
- Full resolution as a third level made it twice as slow and no more accurate: the optimum of mutual
  information itself lies 0.3-0.5 mm (mean over the head) from the truth on this data.

Result: 0.41 s of CPU per series, 0.47 s wall (medians over 20 registrations, machine shared; 0.03 s to
resample). The known motion is recovered to 0.3-0.9 mm at the worst head point and 0.2 degrees for
pre-contrast T1; post-contrast T1, already 0.8 mm off FLAIR unmoved, ends 0.8-1.1 mm off; see
tests/test_registration.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class Level:
    voxel_mm: float  # images are averaged down to about this voxel size (never finer than acquired)
    bins: int  # of the joint intensity histogram
    samples: int  # fixed-image points the metric is computed over
    first_step_mm: float
    last_step_mm: float  # the optimizer stops when its step falls below this


LEVELS = (Level(4.0, 16, 5_000, 2.0, 0.05), Level(2.0, 32, 20_000, 0.5, 0.01))
RELAXATION = 0.8  # step shortening each time the gradient turns back
ITERATIONS = 100  # per level; converging takes 10-50
SEED = 1
THREADS = 1  # as fast as 2 here (the metric's threads gain nothing), leaves a core for the other series
# Mattes MI of real FLAIR/T1 pairs in the head is 0.2-0.5 (reported negated); of FLAIR against noise, 0.0x.
MIN_INFORMATION = 0.1


@dataclass(frozen=True)
class Registration:
    transform: sitk.Transform  # fixed -> moving physical points, as sitk.Resample(moving, fixed, transform) takes
    rotation_deg: float  # of `transform` relative to `initial`
    shift_mm: float  # how far `transform` moves the head's centre relative to `initial`
    metric_before: float  # Mattes MI as SimpleITK reports it (negated: lower is better) at `initial`
    metric_after: float  # ... at `transform`
    seconds: float
    problem: str  # '' when it converged and improved the metric; else why not
    initial: sitk.Transform  # the geometry's transform: identity, or the volumes' centres aligned

    @property
    def improved(self) -> bool:
        return not self.problem


def register_rigid(fixed: sitk.Image, moving: sitk.Image, same_frame: bool = True) -> Registration:
    """Rigid (6 degrees of freedom) registration of `moving` onto `fixed` (FLAIR), by Mattes mutual
    information at two resolutions, initialised from the geometry: identity in patient coordinates when both
    share a frame of reference (`same_frame`), else the volumes' centres aligned. Both images are float32.

    Never raises for a registration that fails: `problem` says why (sitk raised, it did not converge, it did
    not improve the metric, the images share no information). `transform` is then the initial one when sitk
    raised, and what the optimizer reached otherwise, for a caller that registers regardless."""
    start = time.perf_counter()
    initial = sitk.Euler3DTransform()
    if not same_frame:
        initial.SetTranslation(tuple(np.subtract(_centre(moving), _centre(fixed))))

    def fail(problem: str) -> Registration:
        return Registration(initial, 0.0, 0.0, math.nan, math.nan, time.perf_counter() - start, problem, initial)

    try:  # a volume too small to bin (a few slices), or any other refusal of ITK's, is a failed registration
        factors = _factors(fixed, LEVELS[-1].voxel_mm)
        head = sitk.OtsuThreshold(sitk.BinShrink(fixed, factors), 0, 1)
        shape = sitk.LabelShapeStatisticsImageFilter()
        shape.Execute(head)
        if not shape.HasLabel(1):
            return fail("FLAIR has no head to register on (Otsu's threshold selects nothing)")
        # Rotating about the head's centre, not the field of view's, keeps rotation and shift apart.
        centre = shape.GetCentroid(1)
        initial.SetCenter(centre)
        transform = sitk.Euler3DTransform(initial)
        # Only FLAIR's box around the head: the optimizer's scales then follow the head's size, not the field of
        # view's (with the whole field, rotations took small steps and stopped up to 0.6 degrees short).
        first, size = shape.GetBoundingBox(1)[:3], shape.GetBoundingBox(1)[3:]
        head = sitk.RegionOfInterest(head, size, first)
        fixed = sitk.RegionOfInterest(
            fixed, [min(n * f, m - i * f) for n, f, m, i in zip(size, factors, fixed.GetSize(), first)],
            [i * f for i, f in zip(first, factors)])
        pyramid = [(_binned(fixed, level.voxel_mm), _binned(moving, level.voxel_mm)) for level in LEVELS]
        extremes = sitk.MinimumMaximumImageFilter()
        extremes.Execute(pyramid[-1][1])
        if extremes.GetMinimum() == extremes.GetMaximum():
            return fail(f"the moving image is constant ({extremes.GetMinimum():g})")
        before = _metric(pyramid[-1], head, LEVELS[-1], initial)
        for images, level in zip(pyramid, LEVELS):
            method = _method(images[0], head, level)
            method.SetOptimizerAsRegularStepGradientDescent(
                learningRate=level.first_step_mm, minStep=level.last_step_mm, numberOfIterations=ITERATIONS,
                relaxationFactor=RELAXATION)
            method.SetOptimizerScalesFromPhysicalShift()
            method.SetInitialTransform(transform, inPlace=True)
            method.Execute(*images)
        after = _metric(pyramid[-1], head, LEVELS[-1], transform)
    except RuntimeError as e:
        return fail(f"SimpleITK failed: {str(e).strip().splitlines()[-1]}")

    matrix = np.reshape(transform.GetMatrix(), (3, 3))
    rotation = math.degrees(math.acos(np.clip((np.trace(matrix) - 1) / 2, -1.0, 1.0)))
    shift = float(np.linalg.norm(np.subtract(transform.TransformPoint(centre), initial.TransformPoint(centre))))
    problem = ""
    if method.GetOptimizerIteration() >= ITERATIONS:
        problem = f"did not converge in {ITERATIONS} iterations"
    elif min(-before, -after) < MIN_INFORMATION:
        problem = f"the images share almost no information (mutual information {-after:.3f})"
    elif after >= before:
        problem = f"did not improve the similarity ({before:.4f} -> {after:.4f})"
    return Registration(transform, rotation, shift, before, after, time.perf_counter() - start, problem, initial)


def _factors(image: sitk.Image, voxel_mm: float) -> list[int]:
    return [max(1, round(voxel_mm / s)) for s in image.GetSpacing()]


def _binned(image: sitk.Image, voxel_mm: float) -> sitk.Image:
    """`image` averaged over blocks of voxels to about `voxel_mm` per axis; thick slices stay as they are."""
    return sitk.BinShrink(image, _factors(image, voxel_mm))


def _centre(image: sitk.Image) -> tuple[float, ...]:
    return image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])


def _method(fixed: sitk.Image, head: sitk.Image, level: Level) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(level.bins)
    method.SetMetricUseMovingImageGradientFilter(False)
    method.SetMetricUseFixedImageGradientFilter(False)
    method.SetMetricFixedMask(head)
    # Points are drawn over all of `fixed` and those outside the head dropped.
    inside = np.count_nonzero(sitk.GetArrayViewFromImage(head)) / head.GetNumberOfPixels()
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(min(1.0, level.samples / (inside * fixed.GetNumberOfPixels())), SEED)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetNumberOfThreads(THREADS)
    return method


def _metric(images: tuple[sitk.Image, sitk.Image], head: sitk.Image, level: Level, transform: sitk.Transform) -> float:
    method = _method(images[0], head, level)
    method.SetInitialTransform(transform)
    return method.MetricEvaluate(*images)
