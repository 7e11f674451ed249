"""The page's Study view under AppTest against the real API: a zipped DICOM study in, lesions scrubbed,
SEG, NIfTI and CSV out."""

from __future__ import annotations

import pytest
from dicom_studies import mr_study, to_files, zip_bytes
from samples import brain
from test_app import assert_clean, metrics, start_page

from brainmets.app.client import Client
from brainmets.app.study_view import channel_row
from brainmets.inputs.study import study_from_upload


@pytest.fixture(scope="module")
def study_zip() -> bytes:
    return zip_bytes(to_files(mr_study([brain(64, seed=s)[0] for s in range(5)]).datasets))


def upload_study(at, files: list[tuple[str, bytes]]):
    at.file_uploader(key="study-upload").set_value([(name, data, "application/octet-stream") for name, data in files])
    return at.run()


def test_the_client_gets_every_output_of_a_study_in_one_run(api_server, study_zip):
    result = Client(api_server).segment_study(study_zip, "study.zip")
    assert result.answer["kind"] == "dicom" and result.answer["slices"] == 5
    masks = study_from_upload(study_zip).mask_slices(result.nifti)
    assert masks.shape == (5, 64, 64) and masks.sum(axis=(1, 2)).tolist() == result.answer["slice_lesion_px"]
    assert result.seg.startswith(bytes(128) + b"DICM") and result.csv.startswith(b"id,voxels,")


def test_a_zipped_study_is_segmented_scrubbed_and_downloadable(api_server, study_zip, tmp_path, monkeypatch):
    answer = Client(api_server).segment_study(study_zip, "study.zip").answer
    assert answer["lesions"], "the tiny model finds something, so the checks below mean something"
    at = start_page(api_server, tmp_path, monkeypatch)
    upload_study(at, [("study.zip", study_zip)])
    assert_clean(at)
    at.button(key="study-run").click().run()
    assert_clean(at)
    assert metrics(at, "Lesions (3-D)") == [str(len(answer["lesions"]))]
    table = next(d.value for d in at.dataframe if "voxels" in d.value.columns)
    assert table["voxels"].tolist() == [les["voxels"] for les in answer["lesions"]]
    slider = at.slider(key="study-slice")
    assert (slider.min, slider.max) == (0, 4) and answer["slice_lesion_px"][slider.value] > 0  # starts on a lesion
    slider.set_value(0).run()
    last = answer["lesions"][-1]
    at.button(key=f"jump-{last['id']}").click().run()
    assert last["first_slice"] <= at.slider(key="study-slice").value <= last["last_slice"]
    assert [b.label for b in at.get("download_button")] == ["DICOM SEG", "Mask NIfTI", "Lesions CSV"]
    channels = next(d.value for d in at.dataframe if "onto FLAIR's grid" in d.value.columns)  # how each got there
    assert channels["onto FLAIR's grid"].tolist() == ["same grid"] * 3 and channels["coverage"].tolist() == ["100%"] * 3
    assert any(c.value.startswith("Steps: read ") and "register 0.00 s" in c.value for c in at.caption)


def test_the_page_shows_a_registered_channel_with_what_registration_found():
    row = channel_row({"channel": "t1_pre", "description": "AX T1", "how": "description", "alignment": "registered",
                       "rotation_deg": 3.04, "shift_mm": 2.46, "coverage": 0.934, "seconds": 0.412})
    assert row["onto FLAIR's grid"] == "registered (3.0°, 2.5 mm)" and row["coverage"] == "93%"


def test_several_files_at_once_are_one_study(api_server, tmp_path, monkeypatch):
    files = list(to_files(mr_study([brain(64, seed=s)[0] for s in range(3)]).datasets).items())
    at = start_page(api_server, tmp_path, monkeypatch)
    upload_study(at, files)
    assert_clean(at)
    assert at.button(key="study-run").label == "Segment the study (3 slices)"
    at.button(key="study-run").click().run()
    assert_clean(at)
    assert metrics(at, "Slices") == ["3"]


def test_a_bad_study_is_named_not_a_traceback(api_server, tmp_path, monkeypatch):
    at = start_page(api_server, tmp_path, monkeypatch)
    upload_study(at, [("junk.zip", zip_bytes({"a.txt": b"hello"}))])
    assert not at.exception
    assert at.error[0].value.startswith("junk.zip: no DICOM file or image found")
