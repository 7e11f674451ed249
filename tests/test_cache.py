"""The dataset cache: exactly `enhance` of every slice, reused without decoding, keyed by data and settings."""

from __future__ import annotations

import numpy as np
import pytest

from brainmets.cache import cache_root, preprocessed
from brainmets.config import PreprocessConfig
from brainmets.data import DataError, Dataset, open_dataset
from brainmets.preprocessing import normalize, preprocess, resize_mask
from conftest import write_dataset

PRE = PreprocessConfig(image_size=64)


@pytest.fixture()
def small(tmp_path):
    return open_dataset(write_dataset(tmp_path / "data", patients=2, slices=3, size=80))


def entries(root):
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_cache_row_is_preprocess_bit_for_bit(small, tmp_path):
    arrays = preprocessed(small, PRE, root=tmp_path / "c", progress=False)
    assert arrays.images.dtype == np.uint8 and arrays.images.shape == (6, 64, 64, 3)
    assert arrays.masks.dtype == np.uint8 and arrays.masks.shape == (6, 64, 64)
    for i, pair in enumerate(small.slices):
        # the 80x80 slices were resized: the cache must hold what serving computes from the raw file
        np.testing.assert_array_equal(normalize(np.asarray(arrays.images[i])), preprocess(small.read_image(pair), PRE))
        np.testing.assert_array_equal(arrays.masks[i], resize_mask(small.read_mask(pair), 64))


def test_index_follows_the_dataset(small, tmp_path):
    arrays = preprocessed(small, PRE, root=tmp_path / "c", progress=False)
    assert arrays.patients == [s.patient for s in small.slices]
    assert arrays.numbers == [1, 2, 3, 1, 2, 3]
    assert arrays.patient_ids() == list(small.patients)
    assert arrays.rows(arrays.patient_ids()[1]) == range(3, 6)
    assert set(np.unique(arrays.masks)) <= {0, 1} and arrays.masks.any()


def test_second_call_reads_the_cache_without_decoding(small, tmp_path, monkeypatch):
    first = preprocessed(small, PRE, root=tmp_path / "c", progress=False)

    def fail(self, pair):
        raise AssertionError("decoded a slice although the cache holds it")

    monkeypatch.setattr(Dataset, "read_image", fail)
    monkeypatch.setattr(Dataset, "read_mask", fail)
    again = preprocessed(open_dataset(small.source.path), PRE, root=tmp_path / "c", progress=False)
    np.testing.assert_array_equal(again.images, first.images)
    assert isinstance(again.images, np.memmap)  # mapped, not loaded
    assert len(entries(tmp_path / "c")) == 1


def test_keyed_by_preprocessing_settings(small, tmp_path):
    root = tmp_path / "c"
    a = preprocessed(small, PRE, root=root, progress=False)
    b = preprocessed(small, PreprocessConfig(image_size=64, clahe_clip=12.0), root=root, progress=False)
    c = preprocessed(small, PreprocessConfig(image_size=32), root=root, progress=False)
    assert len(entries(root)) == 3
    assert not np.array_equal(a.images, b.images)
    assert c.images.shape == (6, 32, 32, 3)


def test_keyed_by_the_data(tmp_path):
    root = write_dataset(tmp_path / "data", patients=1, slices=2, seed=0)
    a = preprocessed(open_dataset(root), PRE, root=tmp_path / "c", progress=False)
    before = np.array(a.images)
    # the same file names with other pixels: a new cache, not the stale one
    write_dataset(tmp_path / "data", patients=1, slices=2, seed=1)
    b = preprocessed(open_dataset(root), PRE, root=tmp_path / "c", progress=False)
    assert len(entries(tmp_path / "c")) == 2
    assert not np.array_equal(before, b.images)


def test_failed_build_leaves_nothing_behind(tmp_path):
    root = write_dataset(tmp_path / "data", patients=1, slices=3)
    victim = next(root.rglob("*_3.tif"))
    victim.write_bytes(b"broken")
    with pytest.raises(DataError, match="_3.tif"):
        preprocessed(open_dataset(root), PRE, root=tmp_path / "c", progress=False)
    assert entries(tmp_path / "c") == []


def test_cache_root_from_environment(monkeypatch, tmp_path, small):
    monkeypatch.setenv("BRAINMETS_CACHE", str(tmp_path / "env-cache"))
    assert cache_root() == tmp_path / "env-cache"
    preprocessed(small, PRE, progress=False)
    assert len(entries(tmp_path / "env-cache")) == 1
