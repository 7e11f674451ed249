"""Training and evaluation data in the field's layouts, one module per layout (as nnU-Net's dataset_conversion):

    reference   this project's <name>.tif + <name>_mask.tif pairs (`brainmets.data`, unchanged)
    brats       BraTS case folders, 2023 and 2021 namings, a <case>-seg / <case>_seg label file per case
    nnunet      an nnU-Net v2 raw dataset: dataset.json, imagesTr/CASE_XXXX, labelsTr/CASE
    dicom-seg   DICOM studies, each with one DICOM SEG

    open_layout(path, layout="auto") -> data.Dataset (reference) or CaseDataset (the others)

Every case of the last three is read by `brainmets.inputs.study` exactly as serving reads the same files
(channels mapped, every sequence on FLAIR's grid, the same 8-bit mapping); its label volume is brought onto
the study's slices with nearest neighbour (`base.onto_slices`); `brainmets.cache` then preprocesses each slice
as it does the reference layout's, giving the same `Arrays`.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from brainmets.data import IMAGE_EXTS, DataError, Dataset, Source, ignored, open_dataset
from brainmets.datasets import brats, dicom_seg, nnunet
from brainmets.datasets.base import CaseDataset, describe_labels, parse_labels

LAYOUTS = ("auto", "reference", "brats", "nnunet", "dicom-seg")
FINDERS = {"brats": brats.find, "nnunet": nnunet.find, "dicom-seg": dicom_seg.find}
EXPECTED = ("expected the reference layout (<name>.tif + <name>_mask.tif), BraTS case folders "
            "(<case>/<case>-t2f.nii.gz ... <case>-seg.nii.gz, or <case>_flair ... <case>_seg), an nnU-Net raw "
            "dataset (dataset.json, imagesTr/, labelsTr/) or DICOM studies each with a DICOM SEG")

__all__ = ["LAYOUTS", "CaseDataset", "describe_labels", "detect", "open_layout", "parse_labels"]


def detect(source: Source) -> str:
    """The layout of what is there: raster slices -> reference; dataset.json at the top -> nnunet; BraTS-named
    NIfTI files -> brats; else DICOM files -> dicom-seg."""
    keys = [k for k in source.keys() if not ignored(k)]
    if any(PurePosixPath(k).suffix.lower() in IMAGE_EXTS for k in keys) and not any(k.lower().endswith(
            (".nii", ".nii.gz")) for k in keys):
        return "reference"
    if "dataset.json" in keys:
        return "nnunet"
    if any(brats.is_brats(k) for k in keys):
        return "brats"
    if any(dicom_seg.header(source, k) is not None for k in keys):
        return "dicom-seg"
    raise DataError(f"{source.path}: no recognisable case: {EXPECTED}")


def open_layout(path: str | Path, layout: str = "auto", register: str = "auto") -> Dataset | CaseDataset:
    """The dataset at `path` (a folder or a zip) in `layout`, detected from what is there with 'auto'. Raises
    DataError when there is nothing to use; cases that cannot be used are listed in `skipped`."""
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    source = Source(Path(path))
    if layout == "auto":
        layout = detect(source)
    if layout == "reference":
        return open_dataset(path)
    dataset = FINDERS[layout](source, register)
    if not dataset.patients:
        reasons = "; ".join(dataset.skipped[:5]) + (f"; and {len(dataset.skipped) - 5} more"
                                                     if len(dataset.skipped) > 5 else "")
        raise DataError(f"{source.path}: no usable {layout} case" + (f" ({reasons})" if reasons else f": {EXPECTED}"))
    return dataset

