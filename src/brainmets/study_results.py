"""A study through the engine in one call, and what comes out: 3-D lesions, the NIfTI mask on the input's
grid, a DICOM SEG referencing the FLAIR series, the lesion table as JSON and CSV.

    result = segment_study(predictor, study, tta=False)
    result.lesions          # 3-D lesions (26-connected), largest first
    result.fingerprint      # what made the mask (brainmets.provenance)
    result.nifti_gz()       # the mask on the input's grid
    result.dicom_seg()      # DICOM input only: a BINARY SEG with one segment, "lesion", its UIDs derived from
                            # the study and the fingerprint
    result.lesions_csv()
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import asdict, dataclass, fields

import cv2
import highdicom as hd
import nibabel as nib
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from scipy import ndimage

from brainmets import __version__
from brainmets.dicomweb import SEG_DESCRIPTION
from brainmets.inference import Predictor, VolumePrediction
from brainmets.provenance import Fingerprint, fingerprint
from brainmets.inputs.study import Study, StudyError

SEG_SERIES_NUMBER = 900  # after the scanner's series, as viewers list derived series


@dataclass(frozen=True)
class Lesion3D:
    id: int  # 1 is the largest
    voxels: int
    volume_mm3: float | None  # None when the voxel size is unknown
    first_slice: int  # 0-based, in the study's slice order (inferior to superior for DICOM and NIfTI)
    last_slice: int
    diameter_mm: float | None  # the largest in-plane extent over its slices; None when the spacing is unknown
    diameter_px: float  # the same in pixels
    centroid: tuple[float, float, float]  # (slice, row, column), voxel indices
    mean_probability: float


def find_lesions_3d(probability: np.ndarray, mask: np.ndarray,
                    spacing: tuple[float, float, float] | None = None) -> list[Lesion3D]:
    """26-connected components of a (N, H, W) mask, as the evaluation counts lesions, largest first."""
    labels, count = ndimage.label(mask, np.ones((3, 3, 3)))
    if not count:
        return []
    # bincount over the labels: one pass, where ndimage's per-label statistics take ten times longer
    voxels = np.bincount(labels.ravel(), minlength=count + 1)
    probability_sums = np.bincount(labels.ravel(), weights=probability.ravel(), minlength=count + 1)
    voxel_mm3 = float(np.prod(spacing)) if spacing else None
    found = []
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        own = labels[box] == label
        centroid = np.argwhere(own).mean(axis=0) + [b.start for b in box]
        found.append(dict(
            voxels=int(voxels[label]), volume_mm3=float(voxels[label] * voxel_mm3) if voxel_mm3 else None,
            first_slice=box[0].start, last_slice=box[0].stop - 1,
            diameter_mm=_largest_diameter(own, spacing[1:]) if spacing else None,
            diameter_px=_largest_diameter(own, (1.0, 1.0)),
            centroid=tuple(float(c) for c in centroid),
            mean_probability=float(probability_sums[label] / voxels[label])))
    found.sort(key=lambda les: -les["voxels"])
    return [Lesion3D(id=n, **les) for n, les in enumerate(found, start=1)]


def _largest_diameter(component: np.ndarray, pixel_mm: tuple[float, float]) -> float:
    """The largest distance across the component in any one slice, pixel edges included (a lone pixel
    measures its diagonal): the longest axial diameter, as RECIST measures a lesion."""
    corners = np.array([(-0.5, -0.5), (-0.5, 0.5), (0.5, -0.5), (0.5, 0.5)])
    best = 0.0
    for plane in component:
        pixels = np.argwhere(plane)
        if not len(pixels):
            continue
        points = ((pixels[:, None, :] + corners[None]).reshape(-1, 2) * pixel_mm).astype(np.float32)
        hull = cv2.convexHull(points)[:, 0, :]
        best = max(best, float(np.sqrt(((hull[:, None] - hull[None]) ** 2).sum(-1)).max()))
    return best


@dataclass
class StudyResult:
    study: Study
    model: str
    probability: np.ndarray  # float32 (N, H, W), the study's slice order
    mask: np.ndarray  # bool (N, H, W)
    lesions: list[Lesion3D]
    seconds: float  # the engine: preprocessing, network, post-processing, lesion analysis
    fingerprint: Fingerprint | None = None  # None for a result made outside the engine (a known mask)

    @property
    def version(self) -> str:
        """The model version a SEG carries: the fingerprint's, else the model's name."""
        return self.fingerprint.version if self.fingerprint else self.model

    @property
    def slice_lesion_px(self) -> list[int]:
        return [int(n) for n in self.mask.sum(axis=(1, 2))]

    @property
    def lesion_voxels(self) -> int:
        return int(self.mask.sum())

    @property
    def lesion_volume_mm3(self) -> float | None:
        return self.lesion_voxels * float(np.prod(self.study.spacing)) if self.study.spacing else None

    def on_grid(self) -> VolumePrediction:
        """The mask on the input's own voxel grid: FLAIR's file or series (column, row, slice), with the NIfTI's
        own header for NIfTI input."""
        data = self.study.on_source_grid(self.mask).transpose(2, 1, 0).astype(np.uint8)
        affine, volume = self.study.source_affine(), self.study.volume
        if volume is not None:
            return VolumePrediction(data, volume.voxel_mm3, affine, volume.header, self.seconds)
        code = 1 if self.study.spacing else 0  # scanner coordinates, or unknown
        header = nib.Nifti1Header()
        header.set_qform(affine, code)
        header.set_sform(affine, code)
        header.set_xyzt_units("mm" if code else "unknown")
        return VolumePrediction(data, abs(float(np.linalg.det(affine[:3, :3]))), affine, header, self.seconds)

    def nifti_gz(self) -> bytes:
        return self.on_grid().nifti_gz()

    def lesion_rows(self) -> list[dict]:
        return [asdict(les) for les in self.lesions]

    def lesions_csv(self) -> str:
        """One row per lesion; the centroid as three columns."""
        names = [f.name for f in fields(Lesion3D) if f.name != "centroid"]
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([*names, "centroid_slice", "centroid_row", "centroid_column"])
        for row in self.lesion_rows():
            writer.writerow([_cell(row[n]) for n in names] + [round(c, 2) for c in row["centroid"]])
        return out.getvalue()

    def dicom_seg(self) -> bytes:
        """A BINARY DICOM SEG over the FLAIR series' instances, one segment "lesion", as OHIF and 3D Slicer
        show beside the images. Its algorithm version and series description carry the model version, and its
        UIDs derive from the study and that version (`seg_uids`): the same study segmented again the same way is
        the same instance, segmented another way another one."""
        if not self.study.reference:
            raise StudyError(f"a DICOM SEG needs DICOM input; this study was read from {self.study.kind} "
                             f"(ask for the NIfTI mask instead)")
        algorithm = hd.AlgorithmIdentificationSequence(name=f"brainmets {self.model}", version=self.version,
                                                       family=codes.cid7162.ArtificialIntelligence)
        segment = hd.seg.SegmentDescription(
            segment_number=1, segment_label="lesion", segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm)
        series_uid, instance_uid = seg_uids(self.study.reference[0].StudyInstanceUID, self.version)
        seg = hd.seg.Segmentation(
            source_images=self.study.reference, pixel_array=self.study.on_source_grid(self.mask),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[segment],
            series_instance_uid=series_uid, series_number=SEG_SERIES_NUMBER, sop_instance_uid=instance_uid,
            instance_number=1, manufacturer="brainmets", manufacturer_model_name=f"brainmets {self.model}",
            software_versions=__version__, device_serial_number="none",
            series_description=f"{SEG_DESCRIPTION} {self.version}")
        out = io.BytesIO()
        seg.save_as(out)
        return out.getvalue()


def _cell(value):
    if isinstance(value, float):
        return round(value, 3)
    return "" if value is None else value


def seg_uids(study_uid: str, version: str) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of our SEG for this study and model version: the same on every run."""
    return (generate_uid(entropy_srcs=[study_uid, version, "series"]),
            generate_uid(entropy_srcs=[study_uid, version, "instance"]))


def segment_study(predictor: Predictor, study: Study, tta: bool = False) -> StudyResult:
    """The whole study in one engine call, then its 3-D lesions; the study's registration setting goes into the
    result's fingerprint."""
    t0 = time.perf_counter()
    stack = predictor.predict_stack(study.slices, tta=tta)
    lesions = find_lesions_3d(stack.probability, stack.mask, study.spacing)
    return StudyResult(study, predictor.name, stack.probability, stack.mask, lesions, time.perf_counter() - t0,
                       fingerprint(predictor, tta, study.register))
