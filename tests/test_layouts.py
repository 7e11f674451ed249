"""Datasets in the field's layouts (`brainmets.datasets`): BraTS case folders (2023 and 2021 names), an nnU-Net
raw dataset, DICOM studies with a DICOM SEG; read through the study path serving uses, labels chosen, bad cases
skipped with their reasons; and train + evaluate from the command line on a BraTS folder."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from scipy import ndimage

from brainmets.cache import preprocessed
from brainmets.config import PreprocessConfig
from brainmets.data import DataError, Dataset
from brainmets.datasets import open_layout, parse_labels
from brainmets.datasets.base import lesion
from brainmets.inputs.study import open_study
from brainmets.preprocessing import enhance, resize_mask
from brainmets.registry import resolve_init
from dicom_studies import mr_study, synthetic_head, to_files, write_files
from nifti_cases import CONTRAST, GRIDS, grid
from samples import nifti

PRE = PreprocessConfig(image_size=64)
B23 = {"t1_pre": "t1n", "flair": "t2f", "t1_post": "t1c", "t2": "t2w", "label": "seg"}
B21 = {"t1_pre": "t1", "flair": "flair", "t1_post": "t1ce", "t2": "t2", "label": "seg"}


def head_volume(sequence: str, centre_mm, label: bool = False, on: str | None = None):
    """A phantom head on `sequence`'s own grid (oblique, anisotropic; `nifti_cases.GRIDS`) with a lesion at
    `centre_mm`; `label`: BraTS-METS labels on FLAIR's grid (or `on`'s): 1 necrosis (< 5 mm from the centre),
    3 enhancing (< 9 mm), 2 oedema (< 15 mm). (voxels, affine)."""
    shape, voxel, degrees = GRIDS[on or ("flair" if label else sequence)]
    affine = grid(shape, voxel, degrees)
    ijk = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), axis=-1)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    head = ((xyz / [60, 75, 50]) ** 2).sum(-1) <= 1
    r = np.linalg.norm(xyz - np.asarray(centre_mm), axis=-1)
    if label:
        return np.select([r < 5, r < 9, r < 15], [1, 3, 2], 0).astype(np.uint8), affine
    inside, bright = CONTRAST[sequence]
    return np.where(r < 15, bright, np.where(head, inside, 0)).astype(np.int16), affine


def write_brats(folder: Path, case: str, names: dict, sep: str, centre, sequences=("t1_pre", "flair", "t1_post", "t2"),
                label_on: str | None = None, label_affine: np.ndarray | None = None) -> Path:
    (folder / case).mkdir(parents=True, exist_ok=True)
    for sequence in sequences:
        (folder / case / f"{case}{sep}{names[sequence]}.nii.gz").write_bytes(nifti(*head_volume(sequence, centre)))
    voxels, affine = head_volume("flair", centre, label=True, on=label_on)
    (folder / case / f"{case}{sep}seg.nii.gz").write_bytes(nifti(voxels, affine if label_affine is None else label_affine))
    return folder / case


CENTRES = ([8, -5, 10], [-10, 10, 0], [15, 5, -8], [0, -15, 5])


@pytest.fixture(scope="module")
def brats_root(tmp_path_factory) -> Path:
    """Four good BraTS 2023 cases, one 2021 case without T1, one without FLAIR (its T1c stands in), and the bad
    ones: FLAIR and both T1s missing, a label with the identity affine, a name used twice."""
    root = tmp_path_factory.mktemp("brats")
    for i, centre in enumerate(CENTRES):
        write_brats(root, f"BraTS-MET-0000{i}-000", B23, "-", centre)
    write_brats(root / "2021", "BraTS2021_00009", B21, "_", CENTRES[0], sequences=("flair", "t1_post"))
    write_brats(root, "BraTS-MET-00100-000", B23, "-", CENTRES[0], sequences=("t1_pre", "t1_post"))
    write_brats(root, "BraTS-MET-00103-000", B23, "-", CENTRES[0], sequences=("t2",))
    write_brats(root, "BraTS-MET-00101-000", B23, "-", CENTRES[1], label_affine=np.eye(4))
    write_brats(root, "BraTS-MET-00102-000", B23, "-", CENTRES[1])
    write_brats(root / "again", "BraTS-MET-00102-000", B23, "-", CENTRES[2])
    return root


@pytest.fixture(scope="module")
def brats_arrays(brats_root):
    dataset = open_layout(brats_root)
    return dataset, preprocessed(dataset, PRE, progress=False)


def test_brats_cases_found_and_bad_ones_named(brats_arrays):
    dataset, arrays = brats_arrays
    good = [f"BraTS-MET-0000{i}-000" for i in range(4)] + ["BraTS2021_00009", "BraTS-MET-00100-000"]
    assert dataset.layout == "brats" and sorted(arrays.patient_ids()) == sorted(good)
    skipped = "\n".join(arrays.skipped)
    assert len(arrays.skipped) == 3, skipped
    assert "case BraTS-MET-00103-000" in skipped and "no T1 to stand in" in skipped and "t2 (BraTS-MET-00103-000-t2w" in skipped
    assert "case BraTS-MET-00101-000" in skipped and "BraTS-MET-00101-000-seg.nii.gz" in skipped \
        and "but another affine" in skipped
    assert "case BraTS-MET-00102-000: 2 cases carry this name" in skipped


def test_training_sees_what_serving_sees(brats_root, brats_arrays):
    """One code path: a case's rows are `enhance` of the slices `open_study` gives the API for the same folder."""
    _, arrays = brats_arrays
    for case in ("BraTS-MET-00001-000", "BraTS2021_00009"):
        folder = brats_root / case if case.startswith("BraTS-MET") else brats_root / "2021" / case
        served = np.stack([enhance(s, PRE) for s in open_study(folder).slices])
        np.testing.assert_array_equal(np.asarray(arrays.images[list(arrays.rows(case))]), served)


def test_channels_mapped_and_a_missing_sequence_filled_with_flair(brats_arrays):
    dataset, _ = brats_arrays
    read = dataset.read(dataset.patients["BraTS-MET-00000-000"])
    assert [c.description.rsplit("-", 1)[1] for c in read.study.channels] == ["t1n.nii.gz", "t2f.nii.gz", "t1c.nii.gz"]
    head = read.study.slices[len(read.study.slices) // 2][20:28, 5:12]  # the head, away from the lesion
    t1, flair, t1c = (float(head[..., c].mean()) for c in range(3))  # 8-bit: T1 head 255, T1c 112, FLAIR 85
    assert t1 > t1c > flair
    read = dataset.read(dataset.patients["BraTS2021_00009"])
    assert read.study.channels[0].alignment == "filled with FLAIR"
    slices = np.stack(read.study.slices)
    np.testing.assert_array_equal(slices[..., 0], slices[..., 1])


def test_multi_label_to_binary_and_chosen_labels(brats_root, brats_arrays):
    dataset, arrays = brats_arrays
    case = "BraTS-MET-00002-000"
    read = dataset.read(dataset.patients[case])
    assert set(np.unique(read.labels)) == {0, 1, 2, 3}
    rows = list(arrays.rows(case))
    expected = np.stack([resize_mask(lesion(m, None), 64) for m in read.labels])
    np.testing.assert_array_equal(np.asarray(arrays.masks[rows]), expected)
    core = preprocessed(dataset, PRE, progress=False, labels=parse_labels("1,3"))
    whole, inner = np.asarray(arrays.masks[rows]).sum(), np.asarray(core.masks[rows]).sum()
    assert 0 < inner < whole
    np.testing.assert_array_equal(np.asarray(core.masks[rows]),
                                  np.stack([resize_mask(lesion(m, (1, 3)), 64) for m in read.labels]))
    assert parse_labels("") is None
    with pytest.raises(ValueError, match="positive label values"):
        parse_labels("0,1")


def test_label_file_on_another_grid_is_resampled_nearest_neighbour(tmp_path, brats_arrays):
    dataset, _ = brats_arrays
    write_brats(tmp_path, "BraTS-MET-00007-000", B23, "-", CENTRES[2], label_on="t2")
    shifted = grid(*GRIDS["t2"])
    shifted[:3, 3] += 300  # 30 cm off: the label's affine disagrees with the images'
    write_brats(tmp_path / "off", "BraTS-MET-00008-000", B23, "-", CENTRES[2], label_on="t2", label_affine=shifted)
    other = open_layout(tmp_path)
    with pytest.raises(DataError, match="BraTS-MET-00008-000-seg.nii.gz: 100% of its labelled voxels lie outside"):
        other.read(other.patients["BraTS-MET-00008-000"])
    read = other.read(other.patients["BraTS-MET-00007-000"])
    assert len(read.notes) == 1 and "resampled onto it, nearest neighbour" in read.notes[0]
    assert set(np.unique(read.labels)) <= {0, 1, 2, 3}  # nearest neighbour: no value in between
    same = dataset.read(dataset.patients["BraTS-MET-00002-000"]).labels > 0  # same lesion, FLAIR's grid
    moved = read.labels > 0
    assert 2 * (same & moved).sum() / (same.sum() + moved.sum()) > 0.7


@pytest.fixture(scope="module")
def nnunet_root(tmp_path_factory) -> Path:
    """Three cases in dataset.json's channel order (not the model's), a fourth with a label value dataset.json
    does not declare, and images without a label file."""
    root = tmp_path_factory.mktemp("nnunet") / "Dataset002_Mets"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    order = ("flair", "t1_post", "t1_pre")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "FLAIR", "1": "T1Gd", "2": "T1"}, "file_ending": ".nii.gz", "numTraining": 4,
        "labels": {"background": 0, "necrosis": 1, "edema": 2, "enhancing": 3}}))
    for i, centre in enumerate(CENTRES):
        for c, sequence in enumerate(order):
            (root / f"imagesTr/MET_{i:03d}_{c:04d}.nii.gz").write_bytes(nifti(*head_volume(sequence, centre)))
        voxels, affine = head_volume("flair", centre, label=True)
        if i == 3:
            voxels[voxels == 3] = 4  # not in dataset.json
        (root / f"labelsTr/MET_{i:03d}.nii.gz").write_bytes(nifti(voxels, affine))
    (root / "imagesTr/MET_009_0000.nii.gz").write_bytes(nifti(*head_volume("flair", CENTRES[0])))  # no label file
    return root


def test_nnunet_dataset(nnunet_root):
    """Channel order from dataset.json, labels checked against its `labels`."""
    root = nnunet_root
    dataset = open_layout(root)
    assert dataset.layout == "nnunet" and list(dataset.patients) == ["MET_000", "MET_001", "MET_002", "MET_003"]
    assert dataset.skipped == [f"case MET_009: no label file {root / 'labelsTr/MET_009.nii.gz'}"]
    arrays = preprocessed(dataset, PRE, progress=False)
    assert arrays.patient_ids() == ["MET_000", "MET_001", "MET_002"]
    assert any("case MET_003" in s and "MET_003.nii.gz" in s and "[4]" in s for s in arrays.skipped), arrays.skipped
    read = dataset.read(dataset.patients["MET_000"])
    assert [c.description.rsplit("_", 1)[1] for c in read.study.channels] == ["0002.nii.gz", "0000.nii.gz", "0001.nii.gz"]
    with pytest.raises(DataError, match="--labels 5: not among the labels of"):
        preprocessed(dataset, PRE, progress=False, labels=(1, 5))


def seg_study(patient: str, seed: int):
    """A DICOM study (three MR series over a synthetic head) and a DICOM SEG of three segments (BraTS-METS
    values as segment numbers) drawn over its FLAIR series."""
    slices, masks = synthetic_head(count=10, size=64, pixel_mm=3.5, slice_mm=5.0, seed=seed)
    study = mr_study(slices, pixel_mm=3.5, slice_mm=5.0, patient_id=patient)
    mask = np.stack(masks).astype(bool)
    core = ndimage.binary_erosion(mask, iterations=2)
    labels = np.where(core, 3, np.where(mask, 2, 0)).astype(np.uint8)
    flair = study.series["AX T2 FLAIR"]
    segments = [hd.seg.SegmentDescription(
        segment_number=n, segment_label=name, segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for n, name in ((1, "necrosis"), (2, "oedema"), (3, "enhancing"))]
    seg = hd.seg.Segmentation(
        source_images=flair, pixel_array=labels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=generate_uid(), series_number=100,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="test", manufacturer_model_name="test",
        software_versions="1", device_serial_number="1")
    return study, seg, labels


def test_dicom_studies_with_seg(tmp_path):
    truth = {}
    for i in range(2):
        study, seg, labels = seg_study(f"PAT{i}", seed=i)
        write_files(to_files(study.datasets, f"PAT{i}/DICOM"), tmp_path)
        seg.save_as(tmp_path / f"PAT{i}" / "seg.dcm")
        truth[f"PAT{i}"] = labels
    lonely, _, _ = seg_study("PAT9", seed=9)  # images, no SEG
    write_files(to_files(lonely.datasets, "PAT9/DICOM"), tmp_path)
    dataset = open_layout(tmp_path)
    assert dataset.layout == "dicom-seg" and list(dataset.patients) == ["PAT0", "PAT1"]
    assert len(dataset.skipped) == 1 and "case PAT9" in dataset.skipped[0] and "no DICOM SEG" in dataset.skipped[0]
    read = dataset.read(dataset.patients["PAT0"])
    np.testing.assert_array_equal(read.labels, truth["PAT0"])  # axial, on FLAIR's grid: no resampling
    assert [c.description for c in read.study.channels] == ["AX T1 SE PRE", "AX T2 FLAIR", "AX T1 SE POST GAD"]
    arrays = preprocessed(dataset, PRE, progress=False, labels=(3,))
    rows = list(arrays.rows("PAT1"))
    np.testing.assert_array_equal(np.asarray(arrays.masks[rows]),
                                  np.stack([resize_mask((m == 3).astype(np.uint8), 64) for m in truth["PAT1"]]))


def test_nothing_recognisable_and_forced_layouts(tmp_path, dataset_folder):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="no recognisable case"):
        open_layout(tmp_path)
    assert isinstance(open_layout(dataset_folder), Dataset)  # the reference layout, as open_dataset reads it
    with pytest.raises(DataError, match="no usable brats case"):
        open_layout(dataset_folder, "brats")
    with pytest.raises(DataError, match="unknown layout 'tiff'"):
        open_layout(dataset_folder, "tiff")


def test_second_run_reads_the_cache(brats_root, brats_arrays, monkeypatch):
    dataset, arrays = brats_arrays
    monkeypatch.setattr(type(dataset), "read", lambda self, case: pytest.fail("read again"))
    again = preprocessed(open_layout(brats_root), PRE, progress=False)
    assert again.patients == arrays.patients and again.skipped == arrays.skipped


def test_init_from_best_when_best_is_the_ensemble(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINMETS_MODELS", str(tmp_path))
    for name, val in (("unetpp", 0.5), ("attention-unet", 0.6), ("ensemble", 0.7)):
        (tmp_path / name).mkdir()
        if name != "ensemble":
            (tmp_path / name / "model.pt").write_bytes(b"")
        (tmp_path / name / "metrics.json").write_text(json.dumps({"validation": {"dice_per_patient_mean": val}}))
    path, note = resolve_init("best", "unetpp")
    assert path == tmp_path / "unetpp" / "model.pt" and "ensemble" in note and "unetpp member" in note
    (tmp_path / "ensemble" / "metrics.json").write_text(json.dumps({"validation": {"dice_per_patient_mean": 0.1}}))
    with pytest.raises(ValueError, match="best shipped model is attention-unet .* --init-from unetpp"):
        resolve_init("best", "unetpp")
    assert resolve_init("best", "attention-unet") == (tmp_path / "attention-unet" / "model.pt", None)


def test_train_and_evaluate_on_a_brats_folder(brats_root, nnunet_root, tmp_path):
    from test_cli import assert_one_line_error, cli

    run = tmp_path / "run"
    cli("split", "--data", brats_root, "--out", tmp_path / "split.json")  # the cases found, the unreadable one too
    assert "BraTS-MET-00101-000" in json.dumps(json.loads((tmp_path / "split.json").read_text()))
    trained = cli("train", "--data", brats_root, "--model", "unetpp", "--epochs", 1, "--out", run, "--image-size", 64,
                  "--crop", 32, "--fp32", "--labels", "1,2,3", "--split", tmp_path / "split.json", "--no-progress")
    assert "BraTS-MET-00101-000" not in json.dumps(json.loads((run / "split.json").read_text()))
    assert "3 case(s) skipped" in trained.stderr and "BraTS-MET-00101-000-seg.nii.gz" in trained.stderr
    assert json.loads((run / "config.json").read_text())["labels"] == [1, 2, 3]
    cli("evaluate", "--data", brats_root, "--model", run, "--split", "all", "--out", tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["layout"] == "brats" and report["labels"] == [1, 2, 3]  # the model's labels, from its config
    assert sorted(p["id"] for p in report["per_patient"]) == sorted(
        [f"BraTS-MET-0000{i}-000" for i in range(4)] + ["BraTS2021_00009", "BraTS-MET-00100-000"])
    assert len(report["skipped"]) == 3
    shipped = cli("ship", "--run", run, "--data", brats_root, "--out", tmp_path / "shipped", "--no-onnx",
                  "--data-label", "BraTS-METS phantoms")  # tuned and scored on the labels it learned
    assert "lesion = labels 1, 2, 3" in " ".join(shipped.output.split())  # rich wraps long lines
    assert "label values 1, 2, 3" in (tmp_path / "shipped" / "MODEL_CARD.md").read_text()
    # fine-tuning from that run on another layout; a label value dataset.json does not declare is refused
    tuned = tmp_path / "tuned"
    cli("train", "--data", nnunet_root, "--layout", "nnunet", "--model", "unetpp", "--epochs", 1, "--out", tuned,
        "--image-size", 64, "--crop", 32, "--fp32", "--init-from", run, "--no-progress")
    assert json.loads((tuned / "config.json").read_text())["init_from"] == str(run / "best.pt")
    assert_one_line_error(cli("evaluate", "--data", nnunet_root, "--model", tuned, "--split", "all", "--labels", "2,5",
                              code=2), "--labels 5: not among the labels of", "dataset.json")


def test_a_reference_patient_as_a_brats_case_gives_the_same_network_inputs(dataset_folder, tmp_path):
    """The reference layout's slices of one patient, written as a BraTS case (an anisotropic grid, LPS axial),
    give the same rows: the 8-bit slices pass the intensity mapping unchanged."""
    from brainmets.data import open_dataset

    reference = open_dataset(dataset_folder)
    patient = next(iter(reference.patients))
    pairs = reference.patients[patient]
    stack = np.stack([reference.read_image(p) for p in pairs])  # (slices, rows, columns, 3)
    mask = np.stack([reference.read_mask(p) for p in pairs])
    affine = np.diag([-0.9, -0.9, 5.0, 1.0])  # RAS: columns to the left, rows to posterior, slices up
    case = tmp_path / "case"
    case.mkdir()
    for c, suffix in enumerate(("t1n", "t2f", "t1c")):
        (case / f"case-{suffix}.nii.gz").write_bytes(nifti(stack[..., c].transpose(2, 1, 0).copy(), affine))
    (case / "case-seg.nii.gz").write_bytes(nifti(mask.transpose(2, 1, 0).astype(np.uint8).copy(), affine))
    ours = preprocessed(open_layout(tmp_path), PRE, progress=False)
    theirs = preprocessed(reference, PRE, progress=False)
    rows = list(theirs.rows(patient))
    np.testing.assert_array_equal(np.asarray(ours.images), np.asarray(theirs.images[rows]))
    np.testing.assert_array_equal(np.asarray(ours.masks), np.asarray(theirs.masks[rows]))


def test_model_card_names_the_labels():
    from brainmets.config import make_config
    from brainmets.shipping import _labels_text

    assert "label values 1, 3" in _labels_text(make_config("unetpp", labels=(1, 3)))
    assert "every non-zero label" in _labels_text(make_config("unetpp"))
