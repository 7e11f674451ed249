"""Studies in: DICOM series built as a scanner writes them, numbered slices, NIfTI; hostile zips refused."""

from __future__ import annotations

import gzip
import io
import os
import zipfile

import numpy as np
import pydicom
import pytest
from conftest import synthetic_slice, write_dataset
from dicom_studies import SEQUENCES, mr_slice, mr_study, to_bytes, to_files, write_files, zip_bytes
from nifti_cases import CASES, GRIDS, LESION_MM, phantom, write_cases
from samples import nifti

from brainmets.inputs.dicom import classify
from brainmets.inputs.study import (CHANNELS, Limits, StudyError, StudyTooLarge, open_study, study_from_datasets,
                                    study_from_files, study_from_upload)

SIZE = 48


@pytest.fixture(scope="module")
def slices() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [synthetic_slice(rng, SIZE, lesion=k in (2, 3))[0] for k in range(6)]


@pytest.fixture(scope="module")
def study(slices):
    return mr_study(slices)


def test_a_dicom_study_is_ordered_along_the_normal_and_its_series_fill_the_channels(slices, study):
    s = study_from_datasets(study.datasets)  # shuffled
    assert s.kind == "dicom" and len(s.slices) == len(slices)
    for got, want in zip(s.slices, slices):
        np.testing.assert_array_equal(got, want)  # channel k of the image came from the series made of channel k
    assert s.spacing == (5.0, 0.9375, 0.9375)
    assert [(c.channel, c.description, c.how) for c in s.channels] == [
        ("t1_pre", "AX T1 SE PRE", "description"), ("flair", "AX T2 FLAIR", "description"),
        ("t1_post", "AX T1 SE POST GAD", "description")]
    assert [d.SOPInstanceUID for d in s.reference] == [d.SOPInstanceUID for d in study.series["AX T2 FLAIR"]]
    assert {x.used_as for x in s.series} == set(CHANNELS) and s.warnings == [] and s.ignored == []
    # voxel (column, row, slice) -> RAS: LPS origin (-120, -120, -60) becomes (120, 120, -60)
    np.testing.assert_allclose(s.source_affine() @ [0, 0, 2, 1], [120, 120, -50, 1])
    np.testing.assert_allclose(np.diag(s.source_affine())[:3], [-0.9375, -0.9375, 5.0])
    assert [c.alignment for c in s.channels] == ["same grid"] * 3 and set(s.seconds) == {"read", "resample", "register"}


def test_slices_are_ordered_by_position_not_by_instance_number(slices):
    """A feet-first or reversed export numbers instances against the positions."""
    reversed_numbers = [(d, ch, {**tags, "InstanceNumber": 1}) for d, ch, tags in SEQUENCES[1:2]]
    study = mr_study(slices, sequences=reversed_numbers)
    s = study_from_datasets(study.datasets[::-1])
    np.testing.assert_array_equal(s.slices[0][..., 1], slices[0][..., 1])
    assert s.channels[1].how == "description" and [c.how for c in s.channels[::2]] == ["filled with FLAIR"] * 2


@pytest.mark.parametrize("tags, expected", [
    (dict(SeriesDescription="t2_tirm_tra_dark-fluid"), ("flair", "description")),
    (dict(SeriesDescription="AX T1 FLAIR"), ("t1_pre", "description")),  # T1-weighted FLAIR is a T1
    (dict(SeriesDescription="T1 MPRAGE +C"), ("t1_post", "description")),
    (dict(SeriesDescription="T1 PRE-CONTRAST"), ("t1_pre", "description")),
    (dict(SeriesDescription="T1 AX", ContrastBolusAgent="Gadovist"), ("t1_post", "description")),
    (dict(SeriesDescription="Series 7", ScanningSequence=["SE", "IR"], InversionTime=2500), ("flair", "sequence tags")),
    (dict(SeriesDescription="Series 8", ScanningSequence="IR", InversionTime=800), (None, "")),
    (dict(SeriesDescription="AX DWI"), (None, "")),
])
def test_series_are_classified_from_description_and_sequence_tags(tags, expected):
    assert classify(mr_slice(np.zeros((4, 4)), **tags)) == expected


def test_flair_only_fills_every_channel(slices):
    study = mr_study(slices, sequences=SEQUENCES[1:2])
    s = study_from_datasets(study.datasets)
    assert [c.how for c in s.channels] == ["filled with FLAIR", "description", "filled with FLAIR"]
    assert [(c.alignment, c.coverage) for c in s.channels] == [("filled with FLAIR", None), ("same grid", 1.0),
                                                               ("filled with FLAIR", None)]
    for got, want in zip(s.slices, slices):
        assert (got == want[..., 1:2]).all()


def test_a_lone_unlabelled_series_is_taken_as_flair_with_a_warning(slices):
    study = mr_study(slices, sequences=[("Series 1", 1, {})])
    s = study_from_datasets(study.datasets)
    assert s.channels[1].how == "only series" and "segmented as FLAIR" in s.warnings[0]


def test_an_explicit_assignment_wins(slices, study):
    # The post-contrast series (number 3) given as FLAIR, pre-contrast T1 given up for FLAIR.
    s = study_from_datasets(study.datasets, {"flair": "3", "t1_pre": "none"})
    assert [(c.description, c.how) for c in s.channels] == [
        ("FLAIR", "filled with FLAIR"), ("AX T1 SE POST GAD", "explicit"), ("FLAIR", "filled with FLAIR")]
    np.testing.assert_array_equal(s.slices[0][..., 1], slices[0][..., 2])
    s = study_from_datasets(study.datasets, {"t1_post": study.uid_of("AX T1 SE PRE")})
    assert s.channels[2].description == "AX T1 SE PRE"
    with pytest.raises(StudyError, match=r"flair='T2 AX' matches no series; the study holds: series 1 'AX T1 SE PRE'"):
        study_from_datasets(study.datasets, {"flair": "T2 AX"})
    with pytest.raises(StudyError, match="unknown channel 'dwi'"):
        study_from_datasets(study.datasets, {"dwi": "1"})


def test_several_unlabelled_series_ask_which_is_flair(slices):
    study = mr_study(slices, sequences=[("Series 1", 0, {}), ("Series 2", 1, {})])
    with pytest.raises(StudyError, match="no FLAIR series among .*flair=<series number"):
        study_from_datasets(study.datasets)


def test_a_series_covering_part_of_flair_is_resampled_and_flair_fills_the_rest(slices):
    study = mr_study(slices)
    study.series["AX T1 SE PRE"] = study.series["AX T1 SE PRE"][:4]  # the two upper slices not acquired
    s = study_from_datasets(study.datasets, register="off")  # geometry alone: registration has its own tests
    assert s.channels[0].alignment == "resampled" and s.channels[0].coverage == pytest.approx(4 / 6, abs=0.05)
    assert "covers 6" in s.warnings[0] and "FLAIR fills the rest of that channel" in s.warnings[0]
    for k, (got, want) in enumerate(zip(s.slices, slices)):
        np.testing.assert_array_equal(got[..., 0], want[..., 0] if k < 4 else want[..., 1])
    assert s.channels[2].alignment == "same grid"


def _series(slices, **per_slice):
    """One FLAIR series; per_slice maps a tag to one value per slice."""
    uid = pydicom.uid.generate_uid()
    return [mr_slice(image[..., 1], position=(0, 0, 5.0 * k), series_uid=uid, instance_number=k + 1,
                     **{tag: values[k] for tag, values in per_slice.items()})
            for k, image in enumerate(slices)]


def test_geometry_errors_name_the_series_and_the_problem(slices):
    orientations = [[1, 0, 0, 0, 1, 0]] * 5 + [[1, 0, 0, 0, 0, -1]]
    with pytest.raises(StudyError, match="mixes slice orientations"):
        study_from_datasets(_series(slices, ImageOrientationPatient=orientations))
    datasets = _series(slices)
    datasets[2].Rows, datasets[2].Columns = 24, 96
    with pytest.raises(StudyError, match="mixes slice sizes 24x96, 48x48"):
        study_from_datasets(datasets)
    positions = [[0, 0, 5.0 * k] for k in (0, 1, 2, 2, 3, 4)]
    with pytest.raises(StudyError, match="two slices at position 10.00 mm"):
        study_from_datasets(_series(slices, ImagePositionPatient=positions))


def test_a_gap_in_positions_is_a_warning(slices):
    positions = [[0, 0, 5.0 * k] for k in (0, 1, 2, 4, 5, 6)]
    s = study_from_datasets(_series(slices, ImagePositionPatient=positions))
    assert len(s.slices) == 6 and s.spacing[0] == 5.0
    assert "1 gap(s) in slice positions, e.g. 10.00 mm after slice 2 where the spacing is 5.00 mm" in s.warnings[0]


def test_a_lone_slice_takes_its_thickness_as_slice_spacing(slices):
    (ds,) = _series(slices[:1])
    assert study_from_datasets([ds]).spacing == (5.0, 0.9375, 0.9375)
    del ds.SpacingBetweenSlices, ds.SliceThickness
    assert study_from_datasets([ds]).spacing is None


def test_too_many_slices_or_voxels_are_refused(slices):
    with pytest.raises(StudyTooLarge, match="has 6 slices; the limit is 5 per series"):
        study_from_datasets(_series(slices), limits=Limits(max_slices=5))
    with pytest.raises(StudyTooLarge, match="48x48x6 voxels; the limit is 10,000"):
        study_from_datasets(_series(slices), limits=Limits(max_voxels=10_000))


def test_a_zip_with_junk_nested_zips_and_traversal_names_reads_the_study_and_lists_the_rest(slices, study, tmp_path,
                                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = to_files(study.datasets)
    files = {("../../" * 3 + name if i % 2 else name): data for i, (name, data) in enumerate(files.items())}
    files.update({"README.txt": b"exported by PACS", "DICOMDIR.zip": zip_bytes({"x": b"y"}),
                  "__MACOSX/._IM1": b"\x00\x05\x16\x07", "/etc/passwd": b"root:x:0:0"})
    s = study_from_upload(zip_bytes(files))
    assert len(s.slices) == len(slices) and [c.how for c in s.channels] == ["description"] * 3
    assert sorted(s.ignored) == ["/etc/passwd: neither DICOM nor an image", "DICOMDIR.zip: a zip inside the zip, not opened",
                                 "README.txt: neither DICOM nor an image"]
    assert os.listdir(tmp_path) == []  # nothing extracted anywhere


def test_zip_bombs_and_oversize_zips_are_refused_before_inflating():
    bomb = zip_bytes({"IM1": bytes(50 * 2**20)})  # 50 MB of zeros deflate to 50 KB
    with pytest.raises(StudyTooLarge, match=r"zip entry 'IM1' inflates 1,0\d\d-fold \(a zip bomb\?\); the limit is 200-fold"):
        study_from_upload(bomb)
    with pytest.raises(StudyTooLarge, match="inflates to 52,428,800 bytes; the limit is 1,000,000"):
        study_from_upload(bomb, limits=Limits(max_bytes=1_000_000))
    many = zip_bytes({f"f{i}": b"" for i in range(30)}, zipfile.ZIP_STORED)
    with pytest.raises(StudyTooLarge, match="the zip holds 30 files; the limit is 20"):
        study_from_upload(many, limits=Limits(max_entries=20))


def test_a_zip_of_nothing_usable_says_what_was_passed_over():
    with pytest.raises(StudyError, match=r"no DICOM file or image found: expected .*\(passed over: a.txt: neither"):
        study_from_upload(zip_bytes({"a.txt": b"hello", "b/": b""}))
    sr = mr_slice(np.zeros((4, 4)))
    del sr.PixelData
    with pytest.raises(StudyError, match="no DICOM image found.*no pixel data"):
        study_from_files([("sr.dcm", to_bytes(sr))])


@pytest.mark.parametrize("tag, value, why", [
    ("Columns", 0, "unreadable image header (no rows or columns)"), ("Rows", None, "unreadable image header"),
    ("NumberOfFrames", 4, "multi-frame image"), ("SamplesPerPixel", 3, "colour image"),
])
def test_instances_that_are_no_grayscale_slice_are_passed_over_and_listed(slices, tag, value, why):
    good, bad = _series(slices[:2])
    if value is None:
        delattr(bad, tag)
    else:
        setattr(bad, tag, value)
    s = study_from_datasets([good, bad])
    assert len(s.slices) == 1 and len(s.ignored) == 1 and s.ignored[0].startswith(f"{bad.SOPInstanceUID}: {why}")


def test_a_patient_folder_of_numbered_slices_is_one_study(tmp_path):
    write_dataset(tmp_path, patients=1, slices=12, size=32)
    folder = next((tmp_path / "Data").iterdir())
    s = open_study(folder)
    assert s.kind == "slices" and len(s.slices) == 12 and s.spacing is None
    assert len(s.ignored) == 12 and all("ground-truth mask" in why for why in s.ignored)
    assert [c.how for c in s.channels] == ["file"] * 3
    from brainmets.data import open_dataset

    dataset = open_dataset(folder)  # the dataset's own order, 1..12 numerically (not 1, 10, 11, 12, 2...)
    for got, pair in zip(s.slices, dataset.slices):
        np.testing.assert_array_equal(got, dataset.read_image(pair))
    (folder / f"{folder.name}_5.tif").unlink()
    assert "miss 1 slice(s): a gap" in open_study(folder).warnings[0]


def test_a_dicom_folder_and_a_nifti_file_open_as_studies(study, tmp_path):
    s = open_study(write_files(to_files(study.datasets), tmp_path / "export"))
    assert s.kind == "dicom" and s.name == "export" and len(s.series) == 3
    path = tmp_path / "brain.nii.gz"
    path.write_bytes(nifti(np.zeros((20, 24, 3), np.int16), np.diag([0.9, 0.8, 3.0, 1.0])))
    s = open_study(path)
    assert s.kind == "nifti" and s.name == "brain" and len(s.slices) == 3 and s.spacing == pytest.approx((3.0, 0.8, 0.9))
    assert s.slices[0].shape == (24, 20, 3) and [c.alignment for c in s.channels] == ["filled with FLAIR", "same grid", "filled with FLAIR"]


def test_a_file_that_is_no_study_is_refused():
    with pytest.raises(ValueError, match="unsupported study: expected a zip of DICOM files"):
        study_from_upload(b"hello")
    with pytest.raises(StudyError, match="broken zip"):
        study_from_upload(b"PK\x03\x04" + bytes(30))


def test_the_datasets_of_a_pacs_are_read_as_they_come(study):
    """dicomweb-client returns datasets already parsed: no bytes, no file names."""
    s = study_from_datasets([pydicom.dcmread(io.BytesIO(to_bytes(d))) for d in study.datasets], name="pacs")
    assert s.name == "pacs" and len(s.reference) == 6


def test_mangled_dicom_files_give_a_study_or_a_clear_error(study):
    """Bytes overwritten or cut anywhere in a few files of a study: pydicom parses lazily, so a broken value
    must be caught where the study is read, not surface later as a 500."""
    from brainmets.inputs.readers import ImageReadError

    rng = np.random.default_rng(0)
    files = to_files(study.datasets)
    names = list(files)
    for _ in range(80):
        mangled = dict(files)
        for name in rng.choice(names, rng.integers(1, 4)):
            data = bytearray(mangled[name])
            if rng.random() < 0.3:
                data = data[:rng.integers(1, len(data))]
            for _ in range(rng.integers(1, 9)):
                data[rng.integers(len(data))] = rng.integers(256)
            mangled[name] = bytes(data)
        try:
            study_from_files(mangled.items())
        except (StudyError, ImageReadError):
            pass


# --- NIfTI case folders: each sequence on its own grid ------------------------------------------------------


def lesion_voxel(s, ras_mm) -> tuple[int, int, int]:
    """(slice, row, column) of the study's slices at a RAS point."""
    column, row, k = s.grid.TransformPhysicalPointToIndex([-ras_mm[0], -ras_mm[1], ras_mm[2]])
    return k, row, column


@pytest.mark.parametrize("folder", sorted(CASES))
def test_a_case_folder_is_one_study_every_sequence_on_its_flair_grid(tmp_path, folder):
    root = write_cases(tmp_path)
    case, files = CASES[folder]
    s = open_study(root / folder)
    assert s.kind == "nifti case" and s.name == case and len(s.slices) == GRIDS["flair"][0][2]  # FLAIR's 12 slices
    by_channel = {c.channel: c for c in s.channels}
    assert by_channel["flair"].alignment == "same grid" and by_channel["flair"].description == files["flair"]
    for channel in ("t1_pre", "t1_post"):
        if channel in files:  # each on its own grid (oblique, sagittal 3-D): brought onto FLAIR's
            assert by_channel[channel].alignment in ("resampled", "registered"), by_channel[channel]
            assert by_channel[channel].description == files[channel]
        else:
            assert by_channel[channel].alignment == "filled with FLAIR"
    assert any(why.startswith(files["t2"]) and "not used by the models" in why for why in s.ignored)
    k, row, column = lesion_voxel(s, LESION_MM)
    lesion, head = s.slices[k][row, column], s.slices[k][row, column + 12]  # 12 px = 42 mm to the patient's left
    assert lesion[1] > head[1] and lesion[2] > head[2]  # bright on FLAIR and after contrast
    if "t1_pre" in files:
        assert lesion[0] < head[0]  # dark on T1: the T1 channel really is the T1 file, in register
    if folder.startswith("Dataset001"):
        assert by_channel["flair"].how == "channel 0 'FLAIR' of ../dataset.json"  # the order from one level up


def test_a_zipped_case_is_read_by_the_upload_path_and_its_label_file_passed_over(tmp_path):
    root = write_cases(tmp_path)
    folder = root / "brats23/BraTS-MET-00001-000"
    s = study_from_upload(zip_bytes({f"case/{p.name}": p.read_bytes() for p in folder.iterdir()}))
    assert s.kind == "nifti case" and [c.alignment != "filled with FLAIR" for c in s.channels] == [True] * 3
    assert any("-seg.nii.gz: a label file" in why for why in s.ignored)


def test_case_folders_that_cannot_be_one_study_say_why(tmp_path):
    root = write_cases(tmp_path)
    brats = root / "brats23/BraTS-MET-00001-000"
    (brats / "BraTS-MET-00001-000-t2f.nii.gz").unlink()
    s = open_study(brats)  # post-contrast T1 stands in for FLAIR, as a lone DICOM series does
    assert s.channels[1].description == "BraTS-MET-00001-000-t1c.nii.gz" and "has no FLAIR" in s.warnings[0]
    for sequence in ("t1c", "t1n"):
        (brats / f"BraTS-MET-00001-000-{sequence}.nii.gz").unlink()
    with pytest.raises(StudyError, match=r"case BraTS-MET-00001-000 has neither FLAIR nor a T1 .*\(found: t2\)"):
        open_study(brats)
    (root / "brats21/BraTS2021_00001/BraTS2021_00002_flair.nii").write_bytes(phantom("flair"))
    with pytest.raises(StudyError, match="2 cases in one study"):
        open_study(root / "brats21/BraTS2021_00001")
    (root / "lone/BraTS2021_00001_flair.nii").write_bytes(phantom("flair"))
    (root / "lone/BraTS2021_00001_FLAIR.nii.gz").write_bytes(gzip.compress(phantom("flair")))
    with pytest.raises(StudyError, match="BraTS2021_00001_FLAIR.nii.gz.*BraTS2021_00001_flair.nii|"
                                         "BraTS2021_00001_flair.nii.*BraTS2021_00001_FLAIR.nii.gz"):
        open_study(root / "lone")


@pytest.mark.parametrize("tag, value, why", [
    ("ImageOrientationPatient", [1, 0, 0, 0.5, 0.5, 0], "is not two orthogonal unit vectors"),
    ("ImageOrientationPatient", [0, 0, 0, 0, 1, 0], "is not two orthogonal unit vectors"),
    ("PixelSpacing", [0.0, 0.9], "PixelSpacing .* is not two positive numbers"),
    ("PixelSpacing", [-1.0, 0.9], "PixelSpacing .* is not two positive numbers"),
])
def test_geometry_a_grid_cannot_have_is_refused_naming_the_series(slices, tag, value, why):
    datasets = _series(slices)
    for ds in datasets:
        setattr(ds, tag, value)
    with pytest.raises(StudyError, match=f"series 1 'AX T2 FLAIR' .*{why}"):
        study_from_datasets(datasets)


def test_register_takes_auto_on_or_off():
    with pytest.raises(ValueError, match="unknown register setting 'maybe'; expected one of auto, on, off"):
        study_from_upload(b"PK\x03\x04", register="maybe")
