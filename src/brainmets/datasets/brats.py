"""BraTS case folders: `<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz` (2023 on) or `<case>_{t1,t1ce,t2,flair,seg}`
(2021), at any depth. Sequences are recognised by `brainmets.inputs.cases`, as `brainmets predict` and the API
recognise them; the label file is `<case>-seg` / `<case>_seg` beside them. T2 is optional (the models do not
use it); T1 and T1c are optional (FLAIR fills their channels, as in serving); FLAIR is not.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import PurePosixPath

from brainmets.data import Source, ignored
from brainmets.datasets.base import Case, CaseDataset, CaseSlices, onto_slices, read_label_file, stem
from brainmets.inputs import cases as naming
from brainmets.inputs.study import FLAIR_STAND_INS, study_from_files


def label_case(key: str) -> str | None:
    """The case id of a BraTS label file (`<case>-seg`, `<case>_seg`), else None."""
    name = stem(key)
    if name is None:
        return None
    for separator, suffixes in naming.BRATS.values():
        case, sep, suffix = name.rpartition(separator)
        if sep and case and suffix.lower() == "seg":
            return case
    return None


def is_brats(key: str) -> bool:
    name = stem(key)
    return name is not None and any(
        sep and case and suffix.lower() in suffixes
        for separator, suffixes in naming.BRATS.values()
        for case, sep, suffix in [name.rpartition(separator)])


class BratsDataset(CaseDataset):
    layout = "brats"

    def read(self, case: Case) -> CaseSlices:
        files = [(key, self.source.read(key)) for key in case.images]
        study = study_from_files(files, name=case.id, register=self.register)
        labels, notes = onto_slices(study, read_label_file(self.source, case.label), self.describe(case.label))
        return CaseSlices(study, labels, notes)


def find(source: Source, register: str = "auto") -> BratsDataset:
    folders: dict[str, list[str]] = defaultdict(list)
    for key in source.keys():
        if not ignored(key) and is_brats(key):
            folders[str(PurePosixPath(key).parent)].append(key)
    found: dict[str, list[Case]] = defaultdict(list)
    skipped: list[str] = []
    for folder, keys in sorted(folders.items()):
        images = [k for k in keys if label_case(k) is None]
        labels = {label_case(k): k for k in keys if label_case(k) is not None}
        try:
            found_cases, _ = naming.find_cases(images)
        except naming.CaseError as e:  # two files claiming one sequence of a case
            skipped.append(f"{source.describe(folder)}: {e}")
            continue
        for c in found_cases:
            if not set(FLAIR_STAND_INS) & set(c.files):
                there = ", ".join(f"{s} ({PurePosixPath(k).name})" for s, k in c.files.items()) or "nothing"
                skipped.append(f"case {c.case} ({source.describe(folder)}): no FLAIR file (<case>-t2f or "
                               f"<case>_flair) and no T1 to stand in; found {there}. FLAIR is the grid every "
                               f"sequence is brought onto")
            elif c.case not in labels:
                skipped.append(f"case {c.case} ({source.describe(folder)}): no label file ({c.case}-seg.nii.gz or "
                               f"{c.case}_seg.nii.gz)")
            else:
                found[c.case].append(Case(c.case, tuple(c.files.values()), labels[c.case]))
    kept = []
    for case_id, same in found.items():
        if len(same) > 1:
            skipped.append(f"case {case_id}: {len(same)} cases carry this name ("
                           + ", ".join(source.describe(str(PurePosixPath(c.label).parent)) for c in same)
                           + "): case ids must be unique; rename or remove all but one")
        else:
            kept.append(same[0])
    return BratsDataset(source, kept, skipped, register)
