"""An nnU-Net v2 raw dataset: `dataset.json` (`channel_names`, `labels`, `file_ending`), `imagesTr/CASE_XXXX`
with `labelsTr/CASE`. The channel order is dataset.json's (`brainmets.inputs.cases`, as serving reads a case
with its dataset.json); label values must be among its `labels`. Without imagesTr, imagesTs with labelsTs is
read (a held-out set to evaluate on); imagesTs alone is for `brainmets predict`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import PurePosixPath

import numpy as np
import SimpleITK as sitk

from brainmets.data import DataError, Source, ignored
from brainmets.datasets.base import Case, CaseDataset, CaseError, CaseSlices, onto_slices, read_label_file, stem
from brainmets.inputs import cases as naming
from brainmets.inputs.study import FLAIR_STAND_INS, study_from_files

DESCRIPTION = "dataset.json"
FOLDERS = (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs"))


def declared_values(labels: dict) -> set[int]:
    """The label values dataset.json declares: integers, or lists of them (nnU-Net's regions)."""
    values = set()
    for value in labels.values():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and not isinstance(v, bool):
                values.add(v)
    return values


class NnunetDataset(CaseDataset):
    layout = "nnunet"

    def __init__(self, source: Source, cases, skipped, description: dict, register: str = "auto"):
        super().__init__(source, cases, skipped, register)
        self.description = description
        self.declared = declared_values(description["labels"])

    def fingerprint(self) -> str:
        return f"{super().fingerprint()}-{self.source.signature(DESCRIPTION)[:8]}"

    def check_labels(self, labels: tuple[int, ...] | None) -> None:
        unknown = sorted(set(labels or ()) - self.declared)
        if unknown:
            raise DataError(f"--labels {', '.join(map(str, unknown))}: not among the labels of "
                            f"{self.describe(DESCRIPTION)} ({self.description['labels']})")

    def read(self, case: Case) -> CaseSlices:
        files = [(key, self.source.read(key)) for key in case.images]
        files.append((DESCRIPTION, self.source.read(DESCRIPTION)))
        study = study_from_files(files, name=case.id, register=self.register)
        where = self.describe(case.label)
        label = read_label_file(self.source, case.label)
        values = set(np.unique(np.rint(sitk.GetArrayViewFromImage(label))).astype(int).tolist())
        unknown = sorted(values - self.declared)
        if unknown:
            raise CaseError(f"case {case.id} ({where}): label values {unknown} are not among the labels of "
                            f"{DESCRIPTION} ({self.description['labels']})")
        labels, notes = onto_slices(study, label, where)
        return CaseSlices(study, labels, notes)


def find(source: Source, register: str = "auto") -> NnunetDataset:
    if DESCRIPTION not in source.keys():
        raise DataError(f"{source.path}: no {DESCRIPTION} at the top: an nnU-Net raw dataset describes its "
                        f"channels and labels there")
    description = naming.read_dataset_json(source.read(DESCRIPTION), source.describe(DESCRIPTION))
    ending = description.get("file_ending", ".nii.gz")
    channel_names = list(description["channel_names"].values())
    keys = sorted(k for k in source.keys() if not ignored(k))
    present = set(keys)
    images_folder, labels_folder = next(((i, lab) for i, lab in FOLDERS
                                         if any(k.startswith(f"{i}/") for k in keys)
                                         and (i == "imagesTr" or any(k.startswith(f"{lab}/") for k in keys))),
                                        (None, None))
    if images_folder is None:
        raise DataError(f"{source.path}: no imagesTr/ (nor imagesTs/ with labelsTs/) holding CASE_XXXX{ending} files")
    per_case: dict[str, list[str]] = defaultdict(list)
    skipped = []
    for key in keys:
        path = PurePosixPath(key)
        if path.parent.as_posix() != images_folder:
            continue
        match = naming.NNUNET_CHANNEL.match(stem(key) or "")
        if match is None or not key.endswith(ending):
            skipped.append(f"{source.describe(key)}: not named CASE_XXXX{ending}")
            continue
        per_case[match["case"]].append(key)
    found = []
    for case_id, files in sorted(per_case.items()):
        label = f"{labels_folder}/{case_id}{ending}"
        try:
            read, _ = naming.find_cases(files, channel_names, source.describe(DESCRIPTION))
        except naming.CaseError as e:
            skipped.append(f"case {case_id}: {e}")
            continue
        found_case = read[0]
        if not set(FLAIR_STAND_INS) & set(found_case.files):
            there = ", ".join(f"{s} ({PurePosixPath(k).name})" for s, k in found_case.files.items()) or "nothing"
            skipped.append(f"case {case_id} ({source.describe(images_folder)}): no FLAIR channel in "
                           f"{DESCRIPTION}'s channel_names ({', '.join(channel_names)}) and no T1 to stand in; "
                           f"found {there}")
        elif label not in present:
            skipped.append(f"case {case_id}: no label file {source.describe(label)}")
        else:
            found.append(Case(case_id, tuple(sorted(files)), label))
    return NnunetDataset(source, found, skipped, description, register)
