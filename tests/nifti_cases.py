"""One case's sequences as separate NIfTI files, each on its own grid as a real study's are, in the field's
layouts (BraTS 2023 and 2021 names, an nnU-Net dataset): a phantom head with one lesion, for the case readers,
the study path and `brainmets predict`.

    root = write_cases(tmp_path)   # brats23/, brats21/, Dataset001_Mets/ (imagesTs, labelsTs, dataset.json), lone/
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from samples import nifti

LESION_MM = np.array([8.0, -5.0, 10.0])  # the phantom lesion's centre in patient (RAS) mm; radius 15 mm
# sequence -> (head, lesion) intensity: the lesion bright on FLAIR, T1 post-contrast and T2, dark on T1
CONTRAST = {"t1_pre": (120, 60), "flair": (100, 300), "t1_post": (110, 250), "t2": (90, 250)}
# sequence -> its own grid, as a real study has: (shape, voxel mm, rotation about x, y, z in degrees)
GRIDS = {"flair": ((48, 56, 12), (3.5, 3.5, 6.0), (0, 0, 10)),  # oblique axial, thick slices
         "t1_pre": ((44, 50, 16), (3.8, 3.6, 5.0), (8, 0, -4)),
         "t1_post": ((40, 40, 36), (4.0, 4.0, 4.5), (0, 90, 0)),  # sagittal 3-D
         "t2": ((52, 52, 10), (3.2, 3.2, 7.0), (0, 0, 0))}
CASES = {  # folder -> (case id, file name per sequence and the label file); BraTS 2021 without its T1
    "brats23/BraTS-MET-00001-000": ("BraTS-MET-00001-000", {
        "t1_pre": "BraTS-MET-00001-000-t1n.nii.gz", "flair": "BraTS-MET-00001-000-t2f.nii.gz",
        "t1_post": "BraTS-MET-00001-000-t1c.nii.gz", "t2": "BraTS-MET-00001-000-t2w.nii.gz",
        "label": "BraTS-MET-00001-000-seg.nii.gz"}),
    "brats21/BraTS2021_00001": ("BraTS2021_00001", {
        "flair": "BraTS2021_00001_flair.nii", "t1_post": "BraTS2021_00001_t1ce.nii",
        "t2": "BraTS2021_00001_t2.nii", "label": "BraTS2021_00001_seg.nii"}),
    "Dataset001_Mets/imagesTs": ("MET_001", {  # the channel order of dataset.json, not the model's
        "flair": "MET_001_0000.nii.gz", "t1_pre": "MET_001_0001.nii.gz", "t1_post": "MET_001_0002.nii.gz",
        "t2": "MET_001_0003.nii.gz"}),
}
NNUNET_CHANNELS = {"0": "FLAIR", "1": "T1", "2": "T1Gd", "3": "T2"}


def grid(shape: tuple[int, int, int], voxel: tuple[float, float, float], degrees: tuple[float, float, float]):
    """A voxel -> RAS mm affine of `shape` voxels of `voxel` mm, turned by `degrees`, centred on the origin."""
    linear = Rotation.from_euler("xyz", degrees, degrees=True).as_matrix() @ np.diag(voxel)
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = linear, -linear @ ((np.array(shape) - 1) / 2)
    return affine


def phantom(sequence: str, label: bool = False) -> bytes:
    """One sequence of one head on its own grid, an ellipsoid with a 15 mm lesion at LESION_MM, as .nii bytes;
    `label`: the lesion's mask on FLAIR's grid."""
    shape, voxel, degrees = GRIDS["flair" if label else sequence]
    affine = grid(shape, voxel, degrees)
    ijk = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), axis=-1)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    head = ((xyz / [60, 75, 50]) ** 2).sum(-1) <= 1
    lesion = np.linalg.norm(xyz - LESION_MM, axis=-1) <= 15
    if label:
        return nifti(lesion.astype(np.uint8), affine, gz=False)
    inside, bright_spot = CONTRAST[sequence]
    volume = np.where(lesion, bright_spot, np.where(head, inside, 0)).astype(np.int16)
    return nifti(volume, affine, gz=False)


def write_cases(root: Path) -> Path:
    """A BraTS 2023 case, a BraTS 2021 one, an nnU-Net dataset (dataset.json above imagesTs/, labelsTs/) and an
    unrelated volume beside them."""
    for folder, (case, files) in CASES.items():
        for sequence, name in files.items():
            data = phantom("flair", label=True) if sequence == "label" else phantom(sequence)
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / name).write_bytes(data if name.endswith(".nii") else gzip.compress(data))
    (root / "Dataset001_Mets/labelsTs").mkdir()
    (root / "Dataset001_Mets/labelsTs/MET_001.nii.gz").write_bytes(gzip.compress(phantom("flair", label=True)))
    (root / "Dataset001_Mets/dataset.json").write_text(json.dumps(
        {"channel_names": NNUNET_CHANNELS, "labels": {"background": 0, "metastasis": 1}, "numTraining": 0,
         "file_ending": ".nii.gz"}))
    (root / "lone").mkdir()
    (root / "lone/scan.nii.gz").write_bytes(gzip.compress(phantom("flair")))
    return root
