"""DICOM studies, each with one DICOM SEG (a PACS export): files at any depth, grouped by StudyInstanceUID.
The images are read as serving reads a study (`brainmets.inputs.study`: series mapped to channels, every series
on FLAIR's grid); the SEG is read with highdicom, its frames taken over the instances of the series it
references (ReferencedSeriesSequence), whose grid places it; its segment numbers are the label values. The case
id is the PatientID, with the StudyDate where a patient has several studies.
"""

from __future__ import annotations

import io
from collections import defaultdict

import highdicom as hd
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from brainmets.data import Source, ignored
from brainmets.datasets.base import Case, CaseDataset, CaseError, CaseSlices, onto_slices
from brainmets.inputs import dicom, geometry
from brainmets.inputs.readers import MAX_PIXELS, MAX_VOXELS
from brainmets.inputs.study import FLAIR, Study, study_from_files

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def header(source: Source, key: str) -> pydicom.Dataset | None:
    """A file's DICOM header without its pixels; None for a file that is no DICOM."""
    try:
        if source.is_zip:
            return pydicom.dcmread(io.BytesIO(source.read(key)), stop_before_pixels=True)
        with open(source.path / key, "rb") as f:
            return pydicom.dcmread(f, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError, KeyError, TypeError):
        return None


def is_seg(ds: pydicom.Dataset) -> bool:
    return str(ds.get("SOPClassUID", "")) == SEG_SOP_CLASS or ds.get("Modality") == "SEG"


class DicomSegDataset(CaseDataset):
    layout = "dicom-seg"

    def read(self, case: Case) -> CaseSlices:
        files = [(key, self.source.read(key)) for key in case.images]
        study = study_from_files(files, name=case.id, register=self.register)
        where = self.describe(case.label)
        try:
            seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(self.source.read(case.label))))
        except Exception as e:  # highdicom refuses a broken or unsupported SEG in many ways
            raise CaseError(f"case {case.id} ({where}): not a readable DICOM SEG ({e})") from e
        label, notes = onto_slices(study, _seg_volume(seg, study, files, where), where)
        return CaseSlices(study, label, notes)


def _seg_volume(seg: hd.seg.Segmentation, study: Study, files, where: str):
    """The SEG's segments as one label image (segment numbers) on the grid of the series it references."""
    referenced = [str(s.SeriesInstanceUID) for s in seg.get("ReferencedSeriesSequence", [])]
    if len(referenced) != 1:
        raise CaseError(f"{where}: references {len(referenced)} series; expected the one series it was drawn on")
    flair_uid = study.channels[FLAIR].series_uid
    if referenced[0] == flair_uid:
        instances, grid = study.reference, study.source_grid
    else:
        datasets = [pydicom.dcmread(io.BytesIO(data)) for _, data in files]
        series, _ = dicom.series_of([ds for ds in datasets if str(ds.get("SeriesInstanceUID")) == referenced[0]],
                                    1000, MAX_VOXELS, [])
        if not series:
            raise CaseError(f"{where}: references series {referenced[0]}, which is not among the study's images")
        instances = series[0].datasets
        grid = dicom.scan(series[0], MAX_PIXELS, lambda v, _: v.astype(np.float32)).image
    try:
        pixels = seg.get_pixels_by_source_instance([str(ds.SOPInstanceUID) for ds in instances],
                                                   combine_segments=True, assert_missing_frames_are_empty=True)
    except Exception as e:  # overlapping segments, frames of other instances, ...
        raise CaseError(f"{where}: its frames cannot be placed on the referenced series ({e})") from e
    return geometry.like(np.asarray(pixels, np.float32), grid)


def find(source: Source, register: str = "auto") -> DicomSegDataset:
    studies: dict[str, dict] = defaultdict(lambda: {"images": [], "segs": [], "patient": "", "date": ""})
    for key in sorted(source.keys()):
        if ignored(key):
            continue
        ds = header(source, key)
        if ds is None or "StudyInstanceUID" not in ds:
            continue
        study = studies[str(ds.StudyInstanceUID)]
        study["segs" if is_seg(ds) else "images"].append(key)
        study["patient"] = study["patient"] or str(ds.get("PatientID", "") or "")
        study["date"] = study["date"] or str(ds.get("StudyDate", "") or "")
    skipped, named = [], defaultdict(list)
    per_patient = defaultdict(int)
    for s in studies.values():
        per_patient[s["patient"]] += 1
    for uid, s in sorted(studies.items()):
        case_id = s["patient"] or uid
        if per_patient[s["patient"]] > 1:
            case_id = f"{case_id}_{s['date'] or uid}"
        where = source.describe(s["images"][0] if s["images"] else s["segs"][0])
        if not s["segs"]:
            skipped.append(f"case {case_id} (study {uid}, e.g. {where}): no DICOM SEG in the study")
        elif len(s["segs"]) > 1:
            skipped.append(f"case {case_id} (study {uid}): {len(s['segs'])} DICOM SEGs ("
                           + ", ".join(source.describe(k) for k in s["segs"]) + "): keep the one to train on")
        elif not s["images"]:
            skipped.append(f"case {case_id} ({source.describe(s['segs'][0])}): a SEG without its study's images")
        else:
            named[case_id].append(Case(case_id, tuple(s["images"]), s["segs"][0]))
    kept = []
    for case_id, same in named.items():
        if len(same) > 1:
            skipped.append(f"case {case_id}: {len(same)} studies carry this name ("
                           + ", ".join(source.describe(c.label) for c in same) + "): case ids must be unique")
        else:
            kept.append(same[0])
    return DicomSegDataset(source, kept, skipped, register)
