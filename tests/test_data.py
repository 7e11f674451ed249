"""Data import: pairs found at any depth and in any accepted format, grouped and ordered; every bad input named."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from brainmets.cache import preprocessed
from brainmets.config import PreprocessConfig
from brainmets.data import DataError, open_dataset
from conftest import synthetic_slice, write_dataset, zip_folder

PRE = PreprocessConfig(image_size=64)


def write_pair(folder: Path, stem: str, ext: str = ".png", size: int = 64, seed: int = 0,
               mask_ext: str | None = None) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    image, mask = tinted_slice(seed, size)
    image_path, mask_path = folder / f"{stem}{ext}", folder / f"{stem}_mask{mask_ext or ext}"
    cv2.imwrite(str(image_path), image[..., ::-1])
    cv2.imwrite(str(mask_path), mask)
    return image_path, mask_path


def tinted_slice(seed: int = 0, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic slice whose three channels differ in brightness, so a channel swap shows."""
    image, mask = synthetic_slice(np.random.default_rng(seed), size)
    return (image.astype(int) + [0, 40, 80]).clip(0, 255).astype(np.uint8), mask


def tree_hash(path: Path) -> str:
    """One hash of every file's relative path, bytes and modification time under `path` (or of the file)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{f.stat().st_mtime_ns}\n".encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def build(dataset, tmp_path):
    return preprocessed(dataset, PRE, root=tmp_path / "cache", progress=False)


# --- what is found, and how it is grouped and ordered ---

def test_counts_grouping_and_numeric_order(dataset_folder):
    ds = open_dataset(dataset_folder)
    assert list(ds.patients) == [f"TCGA_XX_{1000 + p}_2000010{p + 1}" for p in range(4)]
    assert len(ds.slices) == 4 * 12
    for patient, slices in ds.patients.items():
        # 2 before 10: numeric, not lexical, order
        assert [s.number for s in slices] == list(range(1, 13))
        assert all(s.patient == patient and Path(s.image).name == f"{patient}_{s.number}.tif" for s in slices)
        assert all(s.mask == s.image.replace(".tif", "_mask.tif") for s in slices)


def test_zip_and_folder_give_the_same_dataset(dataset_folder, dataset_zip, tmp_path):
    folder, archive = open_dataset(dataset_folder), open_dataset(dataset_zip)
    assert archive.source.is_zip and not folder.source.is_zip
    # dataset_zip holds a __MACOSX/._* entry for every file: none of them may count
    assert any(n.startswith("__MACOSX/") for n in zipfile.ZipFile(dataset_zip).namelist())
    assert [(s.patient, s.number, s.image, s.mask) for s in archive.slices] == \
           [(s.patient, s.number, s.image, s.mask) for s in folder.slices]
    a, b = build(folder, tmp_path / "f"), build(archive, tmp_path / "z")
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert a.patients == b.patients and a.numbers == b.numbers


def test_junk_and_hidden_entries_ignored(tmp_path):
    root = tmp_path / "data"
    write_pair(root / "p1", "scan_1")
    junk = b"\x00\x05\x16\x07" + bytes(78)
    (root / "p1" / "._scan_1.png").write_bytes(junk)
    (root / "p1" / "._scan_1_mask.png").write_bytes(junk)
    (root / "p1" / ".DS_Store").write_bytes(junk)
    (root / "__MACOSX" / "p1").mkdir(parents=True)
    (root / "__MACOSX" / "p1" / "._scan_2.png").write_bytes(junk)  # would be an image without mask
    write_pair(root / ".hidden", "scan_9")  # a whole hidden folder of valid pairs: still ignored
    (root / "notes.txt").write_text("not an image")
    ds = open_dataset(root)
    assert list(ds.patients) == ["p1"] and len(ds.slices) == 1
    assert build(ds, tmp_path).images.shape == (1, 64, 64, 3)


def test_non_tcga_names_grouped_by_folder_at_any_depth(tmp_path):
    root = tmp_path / "scans"
    for n in (10, 2, 1):
        write_pair(root / "site" / "a" / "b" / "alice", f"slice_{n}", seed=n)
    write_pair(root / "bob", "bob_3")
    write_pair(root, "loose_1")  # beside no folder of its own: the dataset's folder names the patient
    ds = open_dataset(root)
    assert list(ds.patients) == ["alice", "bob", "scans"]
    assert [s.number for s in ds.patients["alice"]] == [1, 2, 10]
    assert ds.patients["alice"][2].image == "site/a/b/alice/slice_10.png"
    assert [s.number for s in ds.patients["bob"]] == [3]


def test_tcga_prefix_groups_across_folders(tmp_path):
    patient = "TCGA_AB_1234_20010101"
    write_pair(tmp_path / "x", f"{patient}_2")
    write_pair(tmp_path / "y" / "z", f"{patient}_1")
    ds = open_dataset(tmp_path)
    assert list(ds.patients) == [patient]
    assert [s.number for s in ds.patients[patient]] == [1, 2]


@pytest.mark.parametrize("ext, mask_ext", [(".png", None), (".webp", None), (".jpg", None), (".jpeg", ".png"),
                                           (".tiff", None), (".webp", ".png")])
def test_every_accepted_format(tmp_path, ext, mask_ext):
    root = tmp_path / "data"
    write_pair(root / "p", "s_1", ext, mask_ext=mask_ext)
    ds = open_dataset(root)
    pair = ds.slices[0]
    image, mask = ds.read_image(pair), ds.read_mask(pair)
    expected_image, expected_mask = tinted_slice()
    assert image.shape == (64, 64, 3) and mask.shape == (64, 64) and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 1}  # a lossy (JPEG) mask is thresholded back to binary
    assert (mask == (expected_mask > 0)).mean() > 0.99
    # channel order is the file's (RGB), not OpenCV's BGR
    np.testing.assert_allclose(image.mean(axis=(0, 1)), expected_image.mean(axis=(0, 1)), atol=3)
    if "jp" not in ext:
        np.testing.assert_array_equal(image, expected_image)
    arrays = build(ds, tmp_path)
    assert arrays.images.shape == (1, 64, 64, 3)


def test_sixteen_bit_and_grey_slices_import(tmp_path):
    root = tmp_path / "data" / "p"
    root.mkdir(parents=True)
    grey = (np.random.default_rng(0).random((64, 64)) * 65535).astype(np.uint16)
    mask = np.zeros((64, 64), np.uint16)
    mask[20:30, 20:30] = 65535
    cv2.imwrite(str(root / "s_1.png"), grey)
    cv2.imwrite(str(root / "s_1_mask.png"), mask)
    ds = open_dataset(root.parent)
    assert ds.read_image(ds.slices[0]).dtype == np.uint16
    assert ds.read_mask(ds.slices[0]).sum() == 100
    arrays = build(ds, tmp_path)
    assert arrays.images.dtype == np.uint8 and arrays.masks[0].sum() == 100


# --- every error names the file and what is wrong ---

def expect_error(path, tmp_path, *fragments):
    with pytest.raises(DataError) as e:
        build(open_dataset(path), tmp_path)
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)
    return str(e.value)


def test_image_without_mask(tmp_path):
    write_pair(tmp_path / "d" / "p", "s_1")
    (tmp_path / "d" / "p" / "s_2.png").write_bytes((tmp_path / "d" / "p" / "s_1.png").read_bytes())
    expect_error(tmp_path / "d", tmp_path, str(tmp_path / "d" / "p" / "s_2.png"), "image without mask")


def test_mask_without_image(tmp_path):
    write_pair(tmp_path / "d" / "p", "s_1")
    (tmp_path / "d" / "p" / "s_1.png").rename(tmp_path / "d" / "p" / "s_1.txt")
    expect_error(tmp_path / "d", tmp_path, str(tmp_path / "d" / "p" / "s_1_mask.png"), "mask without image")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
@pytest.mark.parametrize("which", ["image", "mask"])
def test_unreadable_or_truncated_file(tmp_path, damage, which):
    paths = dict(zip(("image", "mask"), write_pair(tmp_path / "d" / "p", "s_1", ".tif")))
    write_pair(tmp_path / "d" / "p", "s_2", ".tif")
    bad = paths[which]
    data = bad.read_bytes()
    bad.write_bytes({"garbage": b"this is not a TIFF" * 20, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    message = expect_error(tmp_path / "d", tmp_path, str(bad))
    reason = message.split(str(bad), 1)[1]  # the test's own folder name says "truncated" too
    assert {"garbage": "unsupported file type", "truncated": "truncated", "empty": "empty file"}[damage] in reason


def test_unreadable_file_inside_zip_is_named(tmp_path):
    write_dataset(tmp_path / "src", patients=1, slices=2)
    victim = next((tmp_path / "src").rglob("*_2.tif"))
    victim.write_bytes(victim.read_bytes()[:100])
    archive = zip_folder(tmp_path / "src", tmp_path / "Data.zip")
    key = victim.relative_to(tmp_path / "src").as_posix()
    expect_error(archive, tmp_path, f"{archive}!{key}", "truncated")


def test_two_files_for_one_slice(tmp_path):
    """Which of scan.tif and scan.png wins must not depend on the order the file system lists them in."""
    image, _ = write_pair(tmp_path / "d" / "p", "s_1", ".tif")
    (tmp_path / "d" / "p" / "s_1.png").write_bytes(b"")
    with pytest.raises(DataError, match="two files for one slice") as e:
        open_dataset(tmp_path / "d")
    assert str(image) in str(e.value) and "s_1.png" in str(e.value)


def test_one_slice_number_twice_in_a_patient(tmp_path):
    """A patient copied into two folders would otherwise count every slice twice."""
    patient = "TCGA_AB_1234_20010101"
    write_pair(tmp_path / "d" / "Data", f"{patient}_1")
    write_pair(tmp_path / "d" / "Data copy", f"{patient}_1")
    with pytest.raises(DataError, match=f"slice 1 of patient {patient} twice") as e:
        open_dataset(tmp_path / "d")
    assert "Data copy" in str(e.value)


def test_size_differs_within_patient(tmp_path):
    write_pair(tmp_path / "d" / "p", "s_1", size=64)
    odd, _ = write_pair(tmp_path / "d" / "p", "s_2", size=80)
    write_pair(tmp_path / "d" / "q", "s_1", size=80)  # another patient may have another size
    expect_error(tmp_path / "d", tmp_path, str(odd), "80x80", "64x64", "patient p")


def test_other_patients_may_have_other_sizes(tmp_path):
    write_pair(tmp_path / "d" / "p", "s_1", size=64)
    write_pair(tmp_path / "d" / "q", "s_1", size=96)
    arrays = build(open_dataset(tmp_path / "d"), tmp_path)
    assert arrays.images.shape == (2, 64, 64, 3) and arrays.masks.shape == (2, 64, 64)


def test_image_and_mask_sizes_differ(tmp_path):
    image, mask = write_pair(tmp_path / "d" / "p", "s_1")
    cv2.imwrite(str(mask), np.zeros((48, 64), np.uint8))
    expect_error(tmp_path / "d", tmp_path, str(image), "64x64", "64x48")


@pytest.mark.parametrize("values", [(0, 128, 255), (5, 255)])
def test_mask_not_binary(tmp_path, values):
    _, mask = write_pair(tmp_path / "d" / "p", "s_1")
    m = np.zeros((64, 64), np.uint8)
    for i, v in enumerate(values):
        m[i * 10:(i + 1) * 10] = v
    cv2.imwrite(str(mask), m)
    expect_error(tmp_path / "d", tmp_path, str(mask), "not binary", str(values[1]))


def test_no_pairs_found(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "readme.txt").write_text("nothing here")
    with pytest.raises(DataError, match="no image/mask pairs found"):
        open_dataset(tmp_path / "d")
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as z:
        z.writestr("__MACOSX/._a.tif", b"junk")
    with pytest.raises(DataError, match="no image/mask pairs found"):
        open_dataset(tmp_path / "empty.zip")


def test_not_a_zip_and_missing_path(tmp_path):
    fake = tmp_path / "Data.zip"
    fake.write_bytes(b"PK but not really a zip" * 10)
    with pytest.raises(DataError, match="not a zip archive") as e:
        open_dataset(fake)
    assert str(fake) in str(e.value)
    with pytest.raises(DataError, match="no such file or folder") as e:
        open_dataset(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value)


# --- the user's data is read, never written ---

def test_user_files_never_modified(dataset_folder, dataset_zip, tmp_path):
    before = tree_hash(dataset_folder), tree_hash(dataset_zip)
    listing = sorted(p for p in dataset_folder.rglob("*")), sorted(dataset_zip.parent.iterdir())
    for path in (dataset_folder, dataset_zip):
        build(open_dataset(path), tmp_path / path.name)
        build(open_dataset(path), tmp_path / path.name)  # and again, from the cache
    assert (tree_hash(dataset_folder), tree_hash(dataset_zip)) == before
    assert (sorted(p for p in dataset_folder.rglob("*")), sorted(dataset_zip.parent.iterdir())) == listing
