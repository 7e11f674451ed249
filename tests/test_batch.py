"""`brainmets predict` over folder trees and zips: mirrored masks, the CSV summary, restarts, N workers."""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
from rich.console import Console

from typer.testing import CliRunner

from brainmets.batch import PROVENANCE, SUMMARY, find_jobs, mask_path, run_batch
from brainmets.cli import app
from brainmets.inference import Predictor
from conftest import write_dataset, zip_folder
from samples import brain, dicom, encode, nifti
from test_inference import bright, fake
from nifti_cases import CASES, LESION_MM, phantom, write_cases

VOXEL = (0.9, 0.9, 3.0)


@pytest.fixture
def tree(tmp_path) -> Path:
    """Slices and a volume at several depths, with a ground-truth mask, a broken PNG and a text file."""
    image, truth = brain(64, seed=1)
    volume = np.stack([brain(64, seed=s)[0][..., 1].T for s in range(4)], axis=2).astype(np.int16)
    files = {
        "p1/a.png": encode(".png", image),
        "p1/a_mask.png": encode(".png", truth),  # ground truth in the reference layout: not an input
        "p1/b.dcm": dicom(image[..., 1].astype(np.uint16)),  # pixel spacing 0.5 x 0.8 mm
        "p2/broken.png": encode(".png", image)[:300],  # a valid header, then cut short
        "p2/notes.txt": b"not an image",
        "p2/sub/v.nii.gz": nifti(volume, np.diag([*VOXEL, 1.0])),
    }
    root = tmp_path / "tree"
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


@pytest.fixture
def pixelwise(monkeypatch):
    """Every Predictor.load in this process gives a network that marks the bright pixels: real lesions."""
    monkeypatch.setattr(Predictor, "load", classmethod(lambda cls, *a, **k: Predictor([fake(bright)], "bright")))


def rows(out: Path) -> list[dict]:
    with (out / SUMMARY).open(newline="") as f:
        return list(csv.DictReader(f))


def quiet() -> Console:
    return Console(file=io.StringIO())


def png(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def volume_mask(path: Path) -> np.ndarray:
    return np.asanyarray(nib.Nifti1Image.from_bytes(gzip.decompress(path.read_bytes())).dataobj)


def test_mask_paths_mirror_the_input_and_keep_other_dots():
    assert mask_path("p/a.webp", "slice") == "p/a.png"
    assert mask_path("p/1.2.840.10008.5", "slice") == "p/1.2.840.10008.5.png"  # a DICOM named by its UID
    assert mask_path("IM.DCM", "slice") == "IM.png"
    assert mask_path("p/v.nii.gz", "volume") == "p/v_mask.nii.gz"
    assert mask_path("T1.NII", "volume") == "T1_mask.nii.gz"


def test_a_tree_is_mirrored_with_one_summary_row_per_input(tree, tmp_path, pixelwise):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(tree), "-m", "bright", "--out", str(out), "--no-progress"])
    assert result.exit_code == 2, result.output  # the broken PNG; the others still ran
    assert "failed: p2/broken.png: unreadable or truncated PNG" in result.output
    assert result.output.strip().splitlines()[-1].startswith("error: 1 of 4 files failed")
    assert "3 files segmented (6 slices)" in result.output and "slices/s" in result.output
    assert "1 ground-truth masks (*_mask), 1 files of no accepted format" in result.output
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["p1/a.png", "p1/b.png", "p2/sub/v_lesions.csv", "p2/sub/v_mask.nii.gz", PROVENANCE, SUMMARY]

    a, b, broken, v = rows(out)
    assert [r["file"] for r in (a, b, broken, v)] == ["p1/a.png", "p1/b.dcm", "p2/broken.png", "p2/sub/v.nii.gz"]
    assert [r["status"] for r in (a, b, broken, v)] == ["ok", "ok", "error", "ok"]
    assert "truncated" in broken["error"] and a["error"] == ""
    for row in (a, b):
        mask = png(out / row["mask"])
        assert row["kind"] == "slice" and row["slices"] == "1" and mask.shape == (64, 64)
        assert set(np.unique(mask)) == {0, 255} and int(row["lesion_px"]) == (mask > 0).sum()
        n, _ = cv2.connectedComponents((mask > 0).astype(np.uint8), connectivity=8)
        assert int(row["lesions"]) == n - 1 >= 1 and float(row["inference_ms"]) > 0
    assert a["lesion_mm2"] == ""  # a PNG carries no pixel spacing
    assert float(b["lesion_mm2"]) == pytest.approx(int(b["lesion_px"]) * 0.5 * 0.8)
    mask = volume_mask(out / v["mask"])
    assert (v["kind"], v["slices"], mask.shape) == ("volume", "4", (64, 64, 4))
    assert int(v["lesion_px"]) == mask.sum() > 0 and int(v["lesions"]) >= 1
    assert float(v["lesion_mm3"]) == pytest.approx(mask.sum() * np.prod(VOXEL), rel=1e-4)
    lesions = (out / "p2/sub/v_lesions.csv").read_text().splitlines()  # a volume is a study of one file
    assert lesions[0].startswith("id,voxels,") and len(lesions) == 1 + int(v["lesions"])


def identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def test_a_second_run_skips_what_is_done_and_redoes_what_a_crash_left(tree, tmp_path, pixelwise):
    out = tmp_path / "out"
    jobs, _ = find_jobs([tree], out)
    first = run_batch(jobs, out, "bright", progress=False, console=quiet())
    assert (first.done, first.failed, first.skipped, first.slices) == (3, 1, 0, 6)
    masks = ["p1/a.png", "p1/b.png", "p2/sub/v_mask.nii.gz"]
    before, summary = {m: identity(out / m) for m in masks}, rows(out)

    again = run_batch(jobs, out, "bright", progress=False, console=quiet())
    assert (again.done, again.failed, again.skipped) == (0, 1, 3)  # the broken file is tried again
    assert {m: identity(out / m) for m in masks} == before
    assert rows(out) == summary  # complete: the skipped files keep their rows, timings included

    # Killed mid-run: one mask never written, another written but its row not yet appended.
    (out / "p1/a.png").unlink()
    with (out / SUMMARY).open("w", newline="") as f:
        writer = csv.DictWriter(f, summary[0].keys())
        writer.writeheader()
        writer.writerows(r for r in summary if r["file"] != "p1/b.dcm")
    resumed = run_batch(jobs, out, "bright", progress=False, console=quiet())
    assert (resumed.done, resumed.skipped) == (2, 1)
    assert identity(out / masks[2]) == before[masks[2]] and identity(out / masks[1]) != before[masks[1]]
    assert [r["file"] for r in rows(out)] == [r["file"] for r in summary]
    assert [r["lesion_px"] for r in rows(out)] == [r["lesion_px"] for r in summary]


def test_a_restart_with_another_model_version_redoes_only_what_that_version_did_not_make(tree, tmp_path, pixelwise):
    """Every ok row names the model version that made its mask (summary.csv's model column, provenance.json);
    a restart reuses a mask only when its version is this run's: here TTA on changes it."""
    import json

    out = tmp_path / "out"
    jobs, _ = find_jobs([tree], out)
    plain = run_batch(jobs, out, "bright", progress=False, console=quiet())
    ok = [j for j in jobs if j.file in {r["file"] for r in rows(out) if r["status"] == "ok"}]
    v_plain = {r["model"] for r in rows(out) if r["status"] == "ok"}
    assert plain.done == 3 and len(v_plain) == 1
    assert json.loads((out / PROVENANCE).read_text())["fingerprint"]["tta"] is False

    first = run_batch(ok[:1], out, "bright", tta=True, progress=False, console=quiet())  # killed after one file
    assert (first.done, first.skipped) == (1, 0)
    before = {j.mask: identity(out / j.mask) for j in ok}
    resumed = run_batch(jobs, out, "bright", tta=True, progress=False, console=quiet())
    assert (resumed.done, resumed.skipped) == (2, 1)  # the two plain masks redone, the TTA one kept
    assert identity(out / ok[0].mask) == before[ok[0].mask]
    assert all(identity(out / j.mask) != before[j.mask] for j in ok[1:])
    made = {r["model"] for r in rows(out) if r["status"] == "ok"}
    provenance = json.loads((out / PROVENANCE).read_text())
    assert len(made) == 1 and made != v_plain and provenance["model_version"] in made
    assert provenance["fingerprint"]["tta"] is True and provenance["masks_by_model_version"] == {made.pop(): 3}
    again = run_batch(jobs, out, "bright", tta=True, progress=False, console=quiet())
    assert (again.done, again.skipped) == (0, 3)


def test_a_data_zip_is_segmented_in_place_one_study_per_patient_without_its_masks(tmp_path, pixelwise):
    archive = zip_folder(write_dataset(tmp_path / "d", patients=2, slices=3), tmp_path / "Data.zip")
    out = tmp_path / "out"
    jobs, passed = find_jobs([archive], out)
    assert passed == {"ground-truth masks (*_mask)": 6}  # and no __MACOSX entry
    summary = run_batch(jobs, out, "bright", progress=False, console=quiet())
    assert summary.done == 2 and summary.failed == 0 and summary.slices == 6
    for row, patient in zip(rows(out), ("TCGA_XX_1000_20000101", "TCGA_XX_1001_20000102")):
        assert (row["file"], row["kind"], row["slices"]) == (f"Data/{patient}", "study", "3")
        assert row["mask"] == f"Data/{patient}_mask.nii.gz" and row["lesion_mm3"] == ""  # no voxel size in a TIFF
        masks = [png(out / f"Data/{patient}/{patient}_{n}.png") for n in (1, 2, 3)]
        assert all(m.shape == (64, 64) for m in masks)
        stack = volume_mask(out / row["mask"])
        assert stack.shape == (64, 64, 3) and int(row["lesion_px"]) == stack.sum() == sum((m > 0).sum() for m in masks)
        np.testing.assert_array_equal(stack.transpose(2, 1, 0), np.stack(masks) > 0)
        lesions = (out / f"Data/{patient}_lesions.csv").read_text().splitlines()
        assert lesions[0].startswith("id,voxels,") and len(lesions) == 1 + int(row["lesions"])
        assert not (out / f"Data/{patient}.seg.dcm").exists()


@pytest.mark.parametrize("layout, name", [("flat", "patient7"), ("series folders", "patient7/DICOM")])
def test_the_dicom_files_of_a_study_are_one_study_with_a_seg(tmp_path, pixelwise, layout, name):
    from dicom_studies import mr_study, to_files, write_files

    study = mr_study([brain(48, seed=s)[0] for s in range(4)])
    files = to_files(study.datasets)  # DICOM/S001/IM00000...: one folder per series
    if layout == "flat":  # three series in one folder, as some exports lay them out
        files = {f"IM{i:05d}": data for i, data in enumerate(files.values())}
    write_files(files, tmp_path / "in" / "patient7")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "in"), "-m", "bright", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "1 file segmented (4 slices)" in result.output
    (row,) = rows(out)
    assert (row["file"], row["kind"], row["mask"]) == (name, "study", f"{name}_mask.nii.gz")
    assert float(row["lesion_mm3"]) == pytest.approx(int(row["lesion_px"]) * 5.0 * 0.9375 ** 2, rel=1e-4)
    import highdicom as hd

    seg = hd.seg.segread(out / f"{name}.seg.dcm")
    flair = [d.SOPInstanceUID for d in study.series["AX T2 FLAIR"]]
    mask = seg.get_pixels_by_source_instance(flair, segment_numbers=[1])[..., 0] > 0
    np.testing.assert_array_equal(volume_mask(out / row["mask"]).transpose(2, 1, 0) > 0, mask)
    assert int(row["lesion_px"]) == mask.sum() > 0
    assert (out / f"{name}_lesions.csv").read_text().count("\n") == 1 + int(row["lesions"])


def test_two_studies_in_one_folder_are_told_apart_by_their_uid(tmp_path):
    from dicom_studies import mr_study, to_files, write_files

    studies = [mr_study([brain(32, seed=s)[0] for s in range(2)], patient_id=p) for p in ("A", "B")]
    files = {f"IM{i:05d}": data for i, data in enumerate(d for s in studies for d in to_files(s.datasets).values())}
    jobs, _ = find_jobs([write_files(files, tmp_path / "in")], tmp_path / "out")
    assert sorted((j.file, len(j.members)) for j in jobs) == sorted((f"in/{s.study_uid}", 6) for s in studies)


def test_inputs_that_cannot_be_told_apart_or_overwritten_are_refused(tmp_path):
    image, _ = brain(32)
    (tmp_path / "in").mkdir()
    for name in ("s.png", "s.webp", "t.png"):
        (tmp_path / "in" / name).write_bytes(encode(f".{name.split('.')[1]}", image))
    jobs, _ = find_jobs([tmp_path / "in"], tmp_path / "in" / "out")
    assert [(j.file, bool(j.error)) for j in jobs] == [("s.png", True), ("s.webp", True), ("t.png", False)]
    assert "also be the mask of s.webp" in jobs[0].error
    (tmp_path / "in" / "out").mkdir()
    (tmp_path / "in" / "out" / "t.png").write_bytes(encode(".png", image))  # an earlier run's mask
    assert len(find_jobs([tmp_path / "in"], tmp_path / "in" / "out")[0]) == 3
    with pytest.raises(ValueError, match="inputs' own folder"):
        find_jobs([tmp_path / "in" / "t.png"], tmp_path / "in")
    with pytest.raises(FileNotFoundError, match="no such file"):
        find_jobs([tmp_path / "missing"], tmp_path / "out")


@pytest.mark.slow
def test_two_workers_write_what_one_writes(tree, tiny_run, tmp_path):
    """Real processes, each loading the tiny trained model."""
    jobs, _ = find_jobs([tree], tmp_path / "one")
    one = run_batch(jobs, tmp_path / "one", str(tiny_run), workers=1, progress=False, console=quiet())
    two = run_batch(jobs, tmp_path / "two", str(tiny_run), workers=2, progress=False, console=quiet())
    assert (two.done, two.failed) == (one.done, one.failed) == (3, 1)
    for a, b in zip(rows(tmp_path / "one"), rows(tmp_path / "two")):
        del a["inference_ms"], b["inference_ms"]
        assert a == b
    for name in ("p1/a.png", "p1/b.png"):
        np.testing.assert_array_equal(png(tmp_path / "one" / name), png(tmp_path / "two" / name))
    np.testing.assert_array_equal(volume_mask(tmp_path / "one" / "p2/sub/v_mask.nii.gz"),
                                  volume_mask(tmp_path / "two" / "p2/sub/v_mask.nii.gz"))


# --- NIfTI case folders --------------------------------------------------------------------------------------

def test_each_nifti_case_is_one_study_its_label_files_passed_over(tmp_path):
    root = write_cases(tmp_path / "in")
    jobs, passed = find_jobs([root], tmp_path / "out")
    nnunet = "Dataset001_Mets/imagesTs"
    assert [(j.file, j.kind, j.mask, j.error) for j in jobs] == [
        (f"{nnunet}/MET_001", "study", f"{nnunet}/MET_001_mask.nii.gz", ""),
        ("brats21/BraTS2021_00001/BraTS2021_00001", "study", "brats21/BraTS2021_00001/BraTS2021_00001_mask.nii.gz", ""),
        ("brats23/BraTS-MET-00001-000/BraTS-MET-00001-000", "study",
         "brats23/BraTS-MET-00001-000/BraTS-MET-00001-000_mask.nii.gz", ""),
        ("lone/scan.nii.gz", "volume", "lone/scan_mask.nii.gz", "")]  # not a case: a study of its own
    for job, (folder, (_, files)) in zip(jobs, sorted(CASES.items())):
        images = {f"{folder}/{name}" for sequence, name in files.items() if sequence != "label"}
        extra = {"Dataset001_Mets/dataset.json"} if folder == nnunet else set()  # the study reader's channel order
        assert {key for key, _ in job.members} == images | extra and job.channels == ()
        assert all(key == file for key, file in job.members)  # one folder given: files mirror the keys
    assert jobs[3].members == (("lone/scan.nii.gz", "lone/scan.nii.gz"),)
    assert passed == {"label files (segmentation)": 3}
    zipped, passed = find_jobs([zip_folder(root, tmp_path / "cases.zip")], tmp_path / "out")  # the same in a zip
    assert [(j.file, j.members) for j in zipped] == [(j.file, j.members) for j in jobs]
    assert passed == {"label files (segmentation)": 3}


def test_an_nnunet_folder_takes_its_channel_order_from_above_or_from_channels(tmp_path):
    root = write_cases(tmp_path / "in")
    (job,), _ = find_jobs([root / "Dataset001_Mets/imagesTs"], tmp_path / "out")  # dataset.json above the walk
    assert (job.file, job.mask) == ("MET_001", "MET_001_mask.nii.gz")
    assert ("../dataset.json", "../dataset.json") in job.members and job.channels == ()

    (root / "Dataset001_Mets/dataset.json").unlink()
    (job,), _ = find_jobs([root / "Dataset001_Mets/imagesTs"], tmp_path / "out", ["FLAIR", "T1", "T1Gd", "T2"])
    assert len(job.members) == 4 and job.channels == ("FLAIR", "T1", "T1Gd", "T2")
    jobs, _ = find_jobs([root / "Dataset001_Mets/imagesTs"], tmp_path / "out")
    assert [j.kind for j in jobs] == [""] * 4  # refused, each saying what to give
    assert all("give a dataset.json" in j.error and "--channels" in j.error for j in jobs)


def test_two_files_of_one_sequence_refuse_their_case_naming_both(tmp_path):
    root = write_cases(tmp_path / "in")
    folder = root / "brats23/BraTS-MET-00001-000"
    (folder / "BraTS-MET-00001-000-t2f.nii").write_bytes(phantom("flair"))
    jobs, _ = find_jobs([root], tmp_path / "out")
    refused = [j for j in jobs if j.error]
    assert {j.file for j in refused} == {f"brats23/BraTS-MET-00001-000/{p.name}" for p in folder.iterdir()}
    flair = "brats23/BraTS-MET-00001-000/BraTS-MET-00001-000-t2f"
    assert all(f"{flair}.nii and {flair}.nii.gz both claim the flair sequence" in j.error for j in refused)
    assert sum(j.kind == "study" for j in jobs) == 2  # the other cases go on


def test_numbered_slices_named_one_by_one_are_segmented_one_by_one(tmp_path):
    image, _ = brain(32)
    for n in (3, 7):
        (tmp_path / f"a_{n}.jpg").write_bytes(encode(".jpg", image))
    jobs, _ = find_jobs([tmp_path / "a_3.jpg", tmp_path / "a_7.jpg"], tmp_path / "out")
    assert [(j.file, j.kind, j.mask) for j in jobs] == [("a_3.jpg", "slice", "a_3.png"),
                                                        ("a_7.jpg", "slice", "a_7.png")]
    (study,), _ = find_jobs([tmp_path], tmp_path / "out")  # found in their folder, they are one patient's stack
    assert study.kind == "study" and len(study.members) == 2


def nifti_file(path: Path) -> nib.Nifti1Image:
    data = path.read_bytes()
    return nib.Nifti1Image.from_bytes(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)


def test_each_case_gets_one_mask_on_its_flair_grid_and_a_lesion_table(tmp_path, pixelwise):
    root, out = write_cases(tmp_path / "in"), tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(root), "-m", "bright", "--out", str(out), "--no-progress",
                                      "--register", "off"])
    assert result.exit_code == 0, result.output
    assert "4 files segmented" in result.output and "3 label files (segmentation)" in result.output
    flairs = {f"{folder}/{case}": root / folder / files["flair"] for folder, (case, files) in CASES.items()}
    flairs["lone/scan"] = root / "lone/scan.nii.gz"
    summary = {row["mask"]: row for row in rows(out)}
    for name, flair_path in flairs.items():
        flair, mask = nifti_file(flair_path), nifti_file(out / f"{name}_mask.nii.gz")
        assert mask.shape == flair.shape, name
        np.testing.assert_allclose(mask.affine, flair.affine, atol=1e-4, err_msg=name)
        voxels = np.argwhere(np.asanyarray(mask.dataobj) > 0)
        row = summary[f"{name}_mask.nii.gz"]
        assert row["status"] == "ok" and int(row["lesion_px"]) == len(voxels) > 0, name
        centre = nib.affines.apply_affine(mask.affine, voxels).mean(axis=0)
        assert np.linalg.norm(centre - LESION_MM) < 6.0, name  # the lesion found where the phantom has it
        assert float(row["lesion_mm3"]) == pytest.approx(4 / 3 * np.pi * 15 ** 3, rel=0.5), name
        lesions = (out / f"{name}_lesions.csv").read_text().splitlines()
        assert lesions[0].startswith("id,voxels,") and len(lesions) == 1 + int(row["lesions"]), name
    assert not list(out.rglob("*seg*")) and not (out / "Dataset001_Mets/labelsTs").exists()
