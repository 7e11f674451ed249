"""Studies out: the 3-D lesion table, the NIfTI mask on the input grid, the DICOM SEG (read back with highdicom,
checked with dciodvfy), and POST /v1/segment/study with its hostile uploads."""

from __future__ import annotations

import gzip
import io
import shutil
import subprocess
import zipfile

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import api_client, synthetic_slice
from dicom_studies import SEQUENCES, mr_slice, mr_study, patient_slices, to_bytes, to_files, zip_bytes
from samples import brain, encode, nifti

from brainmets.checkpoints import file_sha256
from brainmets.inference import Predictor
from brainmets.inputs.study import study_from_datasets, study_from_upload
from brainmets.study_results import StudyResult, find_lesions_3d, segment_study

SIZE = 48


@pytest.fixture(scope="module")
def study():
    rng = np.random.default_rng(2)
    return mr_study([synthetic_slice(rng, SIZE, lesion=k in (2, 3))[0] for k in range(6)])


def known_mask() -> np.ndarray:
    """Two lesions: a 3x4 block over slices 1-2, and a lone voxel touching nothing (26-connectivity)."""
    mask = np.zeros((6, SIZE, SIZE), bool)
    mask[1:3, 10:13, 20:24] = True
    mask[4, 40, 40] = True
    return mask


def test_lesions_in_3d_are_measured(study):
    mask = known_mask()
    probability = np.where(mask, 0.75, 0.1).astype(np.float32)
    probability[4, 40, 40] = 0.5
    big, lone = find_lesions_3d(probability, mask, (5.0, 0.5, 0.25))
    assert (big.id, big.voxels, big.first_slice, big.last_slice) == (1, 24, 1, 2)
    assert big.volume_mm3 == pytest.approx(24 * 5.0 * 0.5 * 0.25)
    # 3 rows x 4 columns, pixel edges included: sqrt(3² + 4²) px; in mm, rows 0.5 and columns 0.25 mm apart
    assert big.diameter_px == pytest.approx(5.0) and big.diameter_mm == pytest.approx(np.hypot(1.5, 1.0))
    assert big.centroid == pytest.approx((1.5, 11.0, 21.5)) and big.mean_probability == pytest.approx(0.75)
    assert (lone.id, lone.voxels, lone.first_slice, lone.last_slice) == (2, 1, 4, 4)
    assert lone.diameter_px == pytest.approx(np.sqrt(2)) and lone.mean_probability == pytest.approx(0.5)
    assert find_lesions_3d(probability, mask, None)[0].volume_mm3 is None
    assert find_lesions_3d(probability, np.zeros_like(mask)) == []


def fixed_result(study, mask=None) -> StudyResult:
    s = study_from_datasets(study.datasets)
    mask = known_mask() if mask is None else mask
    probability = mask.astype(np.float32)
    return StudyResult(s, "unetpp", probability, mask, find_lesions_3d(probability, mask, s.spacing), 0.0)


def test_the_lesion_csv_has_a_row_per_lesion(study):
    lines = fixed_result(study).lesions_csv().splitlines()
    assert lines[0] == ("id,voxels,volume_mm3,first_slice,last_slice,diameter_mm,diameter_px,mean_probability,"
                        "centroid_slice,centroid_row,centroid_column")
    assert lines[1].startswith("1,24,105.469,1,2,4.688,5.0,1.0,1.5,11.0,21.5") and len(lines) == 3


def test_the_nifti_mask_lies_on_the_dicom_grid(study):
    result = fixed_result(study)
    image = nib.Nifti1Image.from_bytes(gzip.decompress(result.nifti_gz()))
    data = np.asarray(image.dataobj)
    assert data.shape == (SIZE, SIZE, 6)  # (column, row, slice)
    np.testing.assert_array_equal(data.transpose(2, 1, 0), known_mask())
    # voxel (column 20, row 10, slice 1) is LPS (-120 + 20*0.9375, -120 + 10*0.9375, -60 + 5) = RAS (101.25, 110.625, -55)
    np.testing.assert_allclose(image.affine @ [20, 10, 1, 1], [101.25, 110.625, -55, 1])
    assert int(image.header["sform_code"]) == 1 and image.header.get_xyzt_units()[0] == "mm"


@pytest.mark.parametrize("empty", [False, True], ids=["lesions", "empty"])
def test_the_dicom_seg_reads_back_as_the_mask(study, empty, tmp_path):
    result = fixed_result(study, np.zeros((6, SIZE, SIZE), bool) if empty else None)
    seg = hd.seg.segread(io.BytesIO(result.dicom_seg()))
    assert seg.SegmentationType == "BINARY" and seg.SeriesDescription == "brainmets lesions unetpp"
    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == "lesion"
    assert segment.SegmentAlgorithmName == "brainmets unetpp" and segment.SegmentAlgorithmType == "AUTOMATIC"
    flair = study.series["AX T2 FLAIR"]
    assert seg.StudyInstanceUID == study.study_uid
    assert {r.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence} \
        == {d.SOPInstanceUID for d in flair}
    pixels = seg.get_pixels_by_source_instance([d.SOPInstanceUID for d in flair], segment_numbers=[1])
    np.testing.assert_array_equal(pixels[..., 0] > 0, result.mask)


@pytest.mark.skipif(not shutil.which("dciodvfy"), reason="dciodvfy not installed (Debian package dicom3tools; "
                                                           ".ci/run installs it)")
def test_dciodvfy_finds_no_error_in_the_seg(study, tmp_path):
    path = tmp_path / "study.seg.dcm"
    path.write_bytes(fixed_result(study).dicom_seg())
    report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
    assert errors == [], "\n".join(errors)


def test_a_seg_needs_dicom_input():
    study = study_from_upload(nifti(np.ones((8, 8, 2), np.int16), np.eye(4)))
    result = StudyResult(study, "x", np.zeros((2, 8, 8), np.float32), np.zeros((2, 8, 8), bool), [], 0.0)
    with pytest.raises(ValueError, match="a DICOM SEG needs DICOM input; this study was read from nifti"):
        result.dicom_seg()


def test_a_real_patient_as_a_dicom_study_gets_the_engine_s_mask(real_data, tiny_run):
    """The study path (DICOM series, ordered and channel-mapped) gives the mask the engine gives the dataset's
    own slices of that patient, as `evaluate` reads them."""
    patient = sorted(p for p in real_data.iterdir() if p.is_dir())[0]
    images, _ = patient_slices(patient, first=8, count=6)
    predictor = Predictor.load(tiny_run / "best.pt", threads=1)
    result = segment_study(predictor, study_from_upload(zip_bytes(to_files(mr_study(images).datasets))))
    np.testing.assert_array_equal(result.mask, predictor.predict_stack(images).mask)
    assert result.study.spacing == (5.0, 0.9375, 0.9375)


# --- the API ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(models_root):
    yield from api_client(models_root, threads=1)


def post_study(client, data: bytes, name: str = "study.zip", **params):
    return client.post("/v1/segment/study", files={"file": (name, data)}, params=params)


def test_a_zipped_dicom_study_gets_lesions_channels_and_areas(client, study):
    r = post_study(client, zip_bytes(to_files(study.datasets)))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "attention-unet" and body["kind"] == "dicom"
    assert (body["slices"], body["rows"], body["columns"]) == (6, SIZE, SIZE)
    assert body["spacing_mm"] == [5.0, 0.9375, 0.9375]
    assert [c["description"] for c in body["channels"]] == [d for d, _, _ in SEQUENCES]
    assert len(body["slice_lesion_px"]) == 6 and sum(body["slice_lesion_px"]) == body["lesion_voxels"]
    assert sum(les["voxels"] for les in body["lesions"]) == body["lesion_voxels"]
    assert body["lesion_volume_mm3"] == pytest.approx(body["lesion_voxels"] * 5.0 * 0.9375 ** 2)
    assert body["warnings"] == [] and body["ignored"] == [] and body["inference_ms"] > 0


def test_the_study_comes_back_as_seg_or_nifti(client, study):
    data = zip_bytes(to_files(study.datasets))
    r = post_study(client, data, format="dicom-seg")
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
    seg = hd.seg.segread(io.BytesIO(r.content))
    flair = [d.SOPInstanceUID for d in study.series["AX T2 FLAIR"]]
    mask = seg.get_pixels_by_source_instance(flair, segment_numbers=[1])[..., 0] > 0
    assert int(mask.sum()) == int(r.headers["x-lesion-voxels"])
    r = post_study(client, data, format="nifti")
    assert r.status_code == 200 and "study_mask.nii.gz" in r.headers["content-disposition"]
    volume = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(r.content)).dataobj)
    np.testing.assert_array_equal(volume.transpose(2, 1, 0) > 0, mask)


def test_answers_carry_the_model_version_and_the_seg_s_uids_derive_from_it(client, study, models_root):
    data = zip_bytes(to_files(study.datasets))
    body = post_study(client, data).json()
    version, parts = body["model_version"], body["model_provenance"]
    assert version.startswith("attention-unet-") and parts["version"] == version and parts["digest"][:12] in version
    assert parts["tta"] is False and parts["register"] == "auto" and parts["post"]["threshold"] > 0
    assert [n["sha256"] for n in parts["networks"]] == [file_sha256(models_root / "attention-unet" / "model.pt")]
    segs = [post_study(client, data, format="dicom-seg", **extra) for extra in ({}, {}, {"tta": "true"})]
    assert segs[0].headers["x-model-version"] == version != segs[2].headers["x-model-version"]
    uids = [(d.SeriesInstanceUID, d.SOPInstanceUID, d.SeriesDescription)
            for d in (pydicom.dcmread(io.BytesIO(r.content)) for r in segs)]
    assert uids[0] == uids[1] and uids[0][2] == f"brainmets lesions {version}"
    assert uids[2][0] != uids[0][0] and uids[2][1] != uids[0][1]


def test_an_impossible_format_is_refused_before_the_model_is_looked_for(models_root, tmp_path, monkeypatch):
    """A SEG of a NIfTI upload is refused (422) on a server without the model asked for, where running the
    engine would have answered 404: the format is checked before any inference."""
    shutil.copytree(models_root / "attention-unet", tmp_path / "attention-unet")
    volume = nifti((np.ones((20, 24, 3)) * np.arange(3)).astype(np.int16), np.diag([0.9, 0.8, 3.0, 1]))
    for c in api_client(tmp_path, threads=1, preload=False):
        r = post_study(c, volume, "v.nii.gz", model="unetpp", format="dicom-seg")
        assert r.status_code == 422 and "a DICOM SEG needs DICOM input" in r.json()["detail"]
        assert post_study(c, volume, "v.nii.gz", model="unetpp").status_code == 404


def test_channels_can_be_assigned_in_the_query(client, study):
    r = post_study(client, zip_bytes(to_files(study.datasets)), flair="AX T1 SE POST GAD", t1_pre="none")
    assert r.status_code == 200, r.text
    assert [(c["description"], c["how"]) for c in r.json()["channels"]] == [
        ("FLAIR", "filled with FLAIR"), ("AX T1 SE POST GAD", "explicit"), ("FLAIR", "filled with FLAIR")]
    r = post_study(client, zip_bytes(to_files(study.datasets)), flair="9")
    assert r.status_code == 422 and "flair='9' matches no series" in r.json()["detail"]


def test_a_nifti_study_and_a_zip_of_numbered_slices(client):
    r = post_study(client, nifti((np.ones((20, 24, 3)) * np.arange(3)).astype(np.int16), np.diag([0.9, 0.8, 3.0, 1])), "v.nii.gz")
    assert r.status_code == 200 and r.json()["kind"] == "nifti" and r.json()["slices"] == 3
    r = post_study(client, r.content, "v.nii.gz", format="dicom-seg")
    assert r.status_code == 415  # a JSON answer is no study
    image = encode(".png", synthetic_slice(np.random.default_rng(0), 32)[0])
    files = {f"P/P_{n}.png": image for n in (1, 2, 10)} | {"P/P_1_mask.png": image}
    r = post_study(client, zip_bytes(files))
    assert r.status_code == 200 and r.json()["kind"] == "slices" and r.json()["slices"] == 3
    assert r.json()["ignored"] == ["P/P_1_mask.png: a ground-truth mask"] and "gap" in r.json()["warnings"][0]
    r = post_study(client, zip_bytes(files), format="dicom-seg")
    assert r.status_code == 422 and "a DICOM SEG needs DICOM input" in r.json()["detail"]


def test_the_volume_route_and_the_study_route_give_one_mask(client):
    data = np.stack([brain(48, seed=s)[0][..., 1] for s in range(4)], axis=2).astype(np.int16)
    file = nifti(data, np.diag([0.9, 0.9, 3.0, 1.0]))
    volume = client.post("/v1/segment/volume", files={"file": ("v.nii.gz", file)})
    study = post_study(client, file, "v.nii.gz", format="nifti")
    assert volume.status_code == study.status_code == 200
    masks = [np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(r.content)).dataobj) for r in (volume, study)]
    np.testing.assert_array_equal(*masks)
    assert masks[0].shape == (48, 48, 4) and int(volume.headers["x-lesion-voxels"]) == masks[0].sum() > 0


def _over_limit_study() -> bytes:
    """2,000 slices of one series, 8x8 pixels each: small on the wire, over the 1,000-slice limit (one slice
    copied: the count is checked before the positions)."""
    return zip_bytes(dict.fromkeys((f"IM{k}" for k in range(2000)), to_bytes(mr_slice(np.zeros((8, 8))))))


@pytest.mark.parametrize("make, status, reason", [
    (lambda: zip_bytes({"IM1": bytes(60 * 2**20)}), 413, "a zip bomb"),
    (lambda: zip_bytes({f"IM{i}": b"x" for i in range(10_001)}, zipfile.ZIP_STORED), 413, "the limit is 10,000"),
    (lambda: zip_bytes({"../../../../tmp/evil.dcm": b"x", "inner.zip": zip_bytes({"a": b"b"})}), 422,
     "inner.zip: a zip inside the zip, not opened"),
    (lambda: zip_bytes({"notes.txt": b"hello", "image.jpg.exe": b"MZ"}), 422, "no DICOM file or image found"),
    (lambda: b"PK\x03\x04broken", 422, "broken zip"),
    (lambda: b"just text", 415, "unsupported study"),
    (_over_limit_study, 413, "has 2,000 slices; the limit is 1,000 per series"),
], ids=["bomb", "entries", "traversal-nested", "junk", "broken", "text", "2000-slices"])
def test_hostile_studies_get_4xx_with_a_reason_and_the_server_lives_on(client, make, status, reason):
    r = post_study(client, make())
    assert r.status_code == status, r.text
    assert reason in r.json()["detail"]
    assert client.get("/health").status_code == 200
