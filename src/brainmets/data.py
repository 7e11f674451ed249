"""Find image/mask slice pairs in the data a user actually has: the reference Data.zip or any folder.

Layout accepted: `<stem>.<ext>` beside `<stem>_mask.<ext>` at any depth, ext one of tif/tiff/png/webp/
jpg/jpeg. Slices are grouped by patient (the `TCGA_<inst>_<id>_<date>` prefix of the name, else the
folder they sit in) and ordered by the number after the last underscore, numerically. `__MACOSX/`,
`._*` and hidden entries are ignored. A zip is read in place; nothing of the user's is ever written.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from brainmets.inputs.readers import ImageReadError, decode_image

IMAGE_EXTS = (".tif", ".tiff", ".png", ".webp", ".jpg", ".jpeg")
LOSSY_EXTS = (".jpg", ".jpeg")
MASK_SUFFIX = "_mask"
TCGA_PATIENT = re.compile(r"^(TCGA_[A-Z0-9]+_[A-Z0-9]+_\d{8})_\d+$")
SLICE_NUMBER = re.compile(r"_(\d+)$")


class DataError(ValueError):
    """The dataset cannot be used as given; the message names the file and what is wrong."""


@dataclass(frozen=True)
class SlicePair:
    patient: str
    number: int  # slice position in the patient's volume; -1 where the name carries none
    image: str  # key of the image inside its source (posix path relative to the folder or zip)
    mask: str


class Source:
    """A folder or a zip archive, read-only, addressed by posix keys."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"{self.path}: no such file or folder")
        self.is_zip = self.path.is_file()
        if self.is_zip:
            if not zipfile.is_zipfile(self.path):
                raise DataError(f"{self.path}: not a zip archive (give the Data.zip itself or a folder)")
            self._zip = zipfile.ZipFile(self.path)
            self._info = {i.filename: i for i in self._zip.infolist() if not i.is_dir()}

    def keys(self) -> list[str]:
        if self.is_zip:
            return list(self._info)
        return [p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()]

    def read(self, key: str) -> bytes:
        try:
            if self.is_zip:
                return self._zip.read(key)
            return (self.path / key).read_bytes()
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            raise DataError(f"{self.describe(key)}: cannot read ({e})") from e

    def describe(self, key: str) -> str:
        return f"{self.path}!{key}" if self.is_zip else str(self.path / key)

    def signature(self, key: str) -> str:
        """Cheap content identity: the zip's stored CRC, or a hash of the file's bytes."""
        if self.is_zip:
            info = self._info[key]
            return f"{info.CRC:08x}:{info.file_size}"
        return hashlib.sha1((self.path / key).read_bytes()).hexdigest()


def ignored(key: str) -> bool:
    """Junk a folder or a zip carries besides the data: macOS resource forks (__MACOSX) and hidden files."""
    parts = PurePosixPath(key).parts
    return any(p == "__MACOSX" or p.startswith(".") for p in parts)


def _patient_and_number(key: str, root_name: str) -> tuple[str, int]:
    path = PurePosixPath(key)
    m = TCGA_PATIENT.match(path.stem)
    patient = m.group(1) if m else (path.parent.name or root_name)
    n = SLICE_NUMBER.search(path.stem)
    return patient, int(n.group(1)) if n else -1


@dataclass
class Dataset:
    source: Source
    patients: dict[str, list[SlicePair]]  # patient -> slices in volume order; patients sorted by id

    @property
    def slices(self) -> list[SlicePair]:
        return [s for p in self.patients for s in self.patients[p]]

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for s in self.slices:
            for key in (s.image, s.mask):
                h.update(f"{s.patient}/{s.number}/{self.source.signature(key)}\n".encode())
        return h.hexdigest()[:16]

    def read_image(self, pair: SlicePair) -> np.ndarray:
        return self._decode(pair.image)

    def read_mask(self, pair: SlicePair) -> np.ndarray:
        """The mask as uint8 0/1 (H, W). Lossless masks must hold exactly two values."""
        mask = self._decode(pair.mask)
        if mask.ndim == 3:
            if not (mask == mask[..., :1]).all():
                raise DataError(f"{self.source.describe(pair.mask)}: mask has differing colour channels")
            mask = mask[..., 0]
        if PurePosixPath(pair.mask).suffix.lower() in LOSSY_EXTS:
            return (mask > np.iinfo(mask.dtype).max // 2).astype(np.uint8)
        values = np.unique(mask)
        if len(values) > 2 or (len(values) == 2 and values[0] != 0):
            raise DataError(
                f"{self.source.describe(pair.mask)}: mask is not binary (values {values[:6].tolist()}"
                f"{'...' if len(values) > 6 else ''}); expected 0 and one positive value")
        return (mask > 0).astype(np.uint8)

    def _decode(self, key: str) -> np.ndarray:
        try:
            return decode_image(self.source.read(key))
        except ImageReadError as e:
            raise DataError(f"{self.source.describe(key)}: {e}") from e


def open_dataset(path: str | Path) -> Dataset:
    """Index the slice pairs of a Data.zip or a folder. Raises DataError naming what is wrong."""
    source = Source(Path(path))
    images, masks = {}, {}
    for key in source.keys():
        p = PurePosixPath(key)
        if ignored(key) or p.suffix.lower() not in IMAGE_EXTS:
            continue
        if p.stem.endswith(MASK_SUFFIX):
            found, stem = masks, str(p.with_name(p.stem[: -len(MASK_SUFFIX)]))
        else:
            found, stem = images, str(p.with_suffix(""))
        if stem in found:  # e.g. scan.tif beside scan.png: which one to use is not ours to guess
            raise DataError(f"{source.describe(key)}: two files for one slice, with {found[stem]}; keep one")
        found[stem] = key
    for stem in sorted(masks.keys() - images.keys()):
        raise DataError(f"{source.describe(masks[stem])}: mask without image ({stem}.<ext> not found)")
    for stem in sorted(images.keys() - masks.keys()):
        raise DataError(f"{source.describe(images[stem])}: image without mask ({stem}{MASK_SUFFIX}.<ext> not found)")
    if not images:
        raise DataError(
            f"{source.path}: no image/mask pairs found (expected <name>.tif beside <name>_mask.tif, "
            f"or .png/.webp/.jpg, at any depth)")
    patients: dict[str, list[SlicePair]] = {}
    root_name = source.path.stem
    for stem, key in images.items():
        patient, number = _patient_and_number(key, root_name)
        patients.setdefault(patient, []).append(SlicePair(patient, number, key, masks[stem]))
    ordered = {p: sorted(patients[p], key=lambda s: (s.number, s.image)) for p in sorted(patients)}
    for slices in ordered.values():
        for a, b in zip(slices, slices[1:]):
            if a.number == b.number >= 0:
                raise DataError(f"{source.describe(b.image)}: slice {b.number} of patient {b.patient} twice "
                                f"(also {a.image}); a patient's slices need distinct numbers")
    return Dataset(source, ordered)
