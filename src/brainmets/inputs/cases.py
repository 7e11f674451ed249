"""NIfTI case folders: which file of a case holds which MR sequence, by its name.

A case keeps each sequence in its own NIfTI file, named as the BraTS challenges do
(2023: `<case>-t1n.nii.gz`, `-t1c`, `-t2w`, `-t2f`, `-seg`; 2021: `<case>_t1`, `_t1ce`, `_t2`, `_flair`, `_seg`)
or as nnU-Net does (`<CASE>_0000.nii.gz`, `_0001`, ... whose channel order only the dataset's `dataset.json`
`channel_names`, or the user, can tell). Label files (`-seg`, `_seg`, anything under `labelsTr/` or
`labelsTs/`) are ground truth, never a case's image. Only names are read here; the study reader reads the files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from brainmets.inputs.errors import StudyError

SEQUENCES = ("t1_pre", "flair", "t1_post", "t2")  # t2 is read if present, not used by the shipped models
NIFTI_ENDINGS = (".nii.gz", ".nii")
LABEL_FOLDERS = ("labelsTr", "labelsTs")  # nnU-Net's ground truth, named CASE.nii.gz without a channel
NNUNET = "nnU-Net"

# suffix -> sequence; None marks the label file. Matched case-insensitively: exports upper-case names.
BRATS = {
    "BraTS 2023": ("-", {"t1n": "t1_pre", "t2f": "flair", "t1c": "t1_post", "t2w": "t2", "seg": None}),
    "BraTS 2021": ("_", {"t1": "t1_pre", "flair": "flair", "t1ce": "t1_post", "t2": "t2", "seg": None}),
}
NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")

# A dataset.json channel name, lower-cased with spaces, '-' and '_' removed -> sequence.
CHANNEL_SPELLINGS = {
    **dict.fromkeys(("t1", "t1w", "t1n", "native", "t1native", "t1pre"), "t1_pre"),
    **dict.fromkeys(("flair", "t2f", "t2flair"), "flair"),
    **dict.fromkeys(("t1ce", "t1c", "t1gd", "t1post", "t1contrast"), "t1_post"),
    **dict.fromkeys(("t2", "t2w"), "t2"),
}
LABEL_FILE = "a label file (segmentation), not segmented"


class CaseError(StudyError):
    """A case folder that cannot be read as given; the message names the file(s) and what is wrong."""


@dataclass(frozen=True)
class CaseFiles:
    case: str  # the case id: BraTS' prefix ('BraTS-MET-00001-000'), nnU-Net's CASE of CASE_0000.nii.gz
    files: dict[str, str]  # sequence -> key (posix path as given)
    naming: str  # 'BraTS 2023', 'BraTS 2021' or 'nnU-Net'
    how: dict[str, str]  # sequence -> how it was recognised, e.g. "'-t2f' (BraTS 2023)"


def channel_sequence(name: str) -> str | None:
    """A dataset.json channel name ('FLAIR', 'T1Gd', 't2-flair', ...) -> one of SEQUENCES; None when unknown."""
    return CHANNEL_SPELLINGS.get(re.sub(r"[\s_-]", "", name.lower()))


def read_dataset_json(data: bytes, name: str = "dataset.json") -> dict:
    """An nnU-Net dataset.json, checked: `channel_names` in channel order (keys '0'..'n-1', v1's `modality`
    taken as such), `labels` an object, `file_ending` (when given) a NIfTI one. CaseError naming `name`."""
    try:
        dataset = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CaseError(f"{name}: not JSON ({e})") from e
    if not isinstance(dataset, dict):
        raise CaseError(f"{name}: expected a JSON object with channel_names, labels and file_ending")
    channels = dataset.get("channel_names", dataset.get("modality"))  # nnU-Net v1 called it modality
    if not isinstance(channels, dict) or not channels:
        raise CaseError(f"{name}: no channel_names (e.g. {{\"0\": \"FLAIR\", \"1\": \"T1\", \"2\": \"T1Gd\"}})")
    names = channels.values()
    if set(channels) != {str(i) for i in range(len(channels))} or not all(isinstance(n, str) for n in names):
        raise CaseError(f"{name}: channel_names must map '0'..'{len(channels) - 1}' to names, not {channels}")
    if not isinstance(dataset.get("labels"), dict):
        raise CaseError(f"{name}: no labels object (e.g. {{\"background\": 0, \"lesion\": 1}})")
    ending = dataset.get("file_ending", ".nii.gz")
    if ending not in NIFTI_ENDINGS:
        raise CaseError(f"{name}: file_ending {ending!r}; only NIfTI case folders ({', '.join(NIFTI_ENDINGS)}) "
                        f"are read")
    return {**dataset, "channel_names": {str(i): channels[str(i)] for i in range(len(channels))}}


def find_cases(keys: Sequence[str], channel_names: Sequence[str] | None = None,
               channels_from: str = "dataset.json") -> tuple[list[CaseFiles], list[str]]:
    """The cases among NIfTI files of one folder or zip, grouped by folder and case id, and the files passed
    over ('key: why'). `channel_names` is the nnU-Net channel order (index i names the files `_000i`);
    `channels_from` says where it came from, for `how`. Two files claiming one sequence of a case, or
    nnU-Net names without `channel_names`, are a CaseError."""
    cases: dict[tuple[str, str, str], dict[str, tuple[str, str]]] = {}  # (folder, naming, case) -> seq -> (key, how)
    ignored, unnamed_channels = [], []
    for key in keys:
        path = PurePosixPath(key)
        stem = _stem(path.name)
        if stem is None:
            ignored.append(f"{key}: not a NIfTI file (.nii, .nii.gz)")
            continue
        if any(part in LABEL_FOLDERS for part in path.parts[:-1]):
            ignored.append(f"{key}: {LABEL_FILE}")
            continue
        found = _brats(stem)
        if found is None and (match := NNUNET_CHANNEL.match(stem)):
            if channel_names is None:
                unnamed_channels.append(key)
                continue
            found = _nnunet(key, match, channel_names, channels_from)
        if found is None:
            ignored.append(f"{key}: not named as a case's sequence (BraTS <case>-t2f, <case>_flair; nnU-Net "
                           f"<CASE>_0000)")
            continue
        naming, case, sequence, how = found
        if sequence is None:
            ignored.append(f"{key}: {how}, none of the sequences read ({', '.join(SEQUENCES)})" if naming == NNUNET
                           else f"{key}: {LABEL_FILE}")
            continue
        files = cases.setdefault((str(path.parent), naming, case), {})
        if sequence in files:
            raise CaseError(f"{files[sequence][0]} and {key} both claim the {sequence} sequence of case {case}: "
                            f"keep one")
        files[sequence] = (key, how)
    if unnamed_channels:
        raise CaseError(f"{', '.join(unnamed_channels[:3])}{' ...' if len(unnamed_channels) > 3 else ''}: nnU-Net "
                        f"names (<CASE>_0000.nii.gz) say a channel number, not its sequence; give a dataset.json "
                        f"with channel_names beside the files or one level up, or --channels (e.g. FLAIR,T1,T1Gd,T2)")
    found_cases = [CaseFiles(case, {s: files[s][0] for s in SEQUENCES if s in files}, naming,
                             {s: files[s][1] for s in SEQUENCES if s in files})
                   for (_, naming, case), files in sorted(cases.items())]
    return found_cases, ignored


def is_case_file(key: str) -> bool:
    """Whether a NIfTI file's name follows a case naming (BraTS 2023 or 2021, nnU-Net), label files included."""
    path = PurePosixPath(key)
    stem = _stem(path.name)
    return stem is not None and (any(part in LABEL_FOLDERS for part in path.parts[:-1])
                                 or _brats(stem) is not None or NNUNET_CHANNEL.match(stem) is not None)


def _stem(name: str) -> str | None:
    """The name without its NIfTI ending; None for other files."""
    ending = next((e for e in NIFTI_ENDINGS if name.lower().endswith(e)), None)
    return name[:-len(ending)] if ending else None


def _brats(stem: str) -> tuple[str, str, str | None, str] | None:
    """(naming, case, sequence or None for the label file, how) by a BraTS suffix."""
    for naming, (separator, suffixes) in BRATS.items():
        case, sep, suffix = stem.rpartition(separator)
        if sep and case and suffix.lower() in suffixes:
            return naming, case, suffixes[suffix.lower()], f"'{separator}{suffix}' ({naming})"
    return None


def _nnunet(key: str, match: re.Match, channel_names: Sequence[str],
            channels_from: str) -> tuple[str, str, str | None, str]:
    """(naming, case, sequence or None for a channel of no sequence read (e.g. ADC), how) of `<CASE>_<XXXX>`."""
    channel = int(match["channel"])
    if channel >= len(channel_names):
        raise CaseError(f"{key}: channel {channel}, but {channels_from} names {len(channel_names)} channel(s) "
                        f"({', '.join(channel_names)})")
    name = channel_names[channel]
    return NNUNET, match["case"], channel_sequence(name), f"channel {channel} {name!r} of {channels_from}"
