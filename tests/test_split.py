"""Patient split: disjoint sides, seeded, 80/20 with validation from the training side, saved and loaded."""

from __future__ import annotations

import pytest

from brainmets.split import Split, make_split

PATIENTS = [f"TCGA_XX_{1000 + i}_20000101" for i in range(100)]


def test_no_patient_on_two_sides_and_none_lost():
    s = make_split(PATIENTS + PATIENTS[:10], seed=3)  # a patient listed twice is still one patient
    train, val, test = set(s.train), set(s.val), set(s.test)
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(PATIENTS)
    assert len(s.train) + len(s.val) + len(s.test) == 100


def test_default_is_80_20_with_10_percent_of_all_for_validation_from_train():
    s = make_split(PATIENTS)
    assert (len(s.train), len(s.val), len(s.test)) == (70, 10, 20)
    assert (s.test_fraction, s.val_fraction) == (0.2, 0.1)
    s = make_split(PATIENTS[:88], seed=0)  # the real dataset: 88 patients
    assert (len(s.train), len(s.val), len(s.test)) == (61, 9, 18)


def test_same_seed_same_split_other_seed_other_split():
    a, b = make_split(PATIENTS, seed=7), make_split(list(reversed(PATIENTS)), seed=7)
    assert a == b  # the order the patients are listed in does not matter
    c = make_split(PATIENTS, seed=8)
    assert c.test != a.test and c.seed == 8


def test_sides_are_sorted():
    s = make_split(PATIENTS, seed=1)
    assert all(side == sorted(side) for side in (s.train, s.val, s.test))


@pytest.mark.parametrize("n", [3, 4, 5, 7])
def test_few_patients_still_give_every_side_one(n):
    s = make_split(PATIENTS[:n], seed=0)
    assert len(s.test) >= 1 and len(s.val) >= 1 and len(s.train) >= 1
    assert len(s.train) + len(s.val) + len(s.test) == n


def test_save_load_round_trip(tmp_path):
    s = make_split(PATIENTS[:10], seed=5, fingerprint="abc123")
    s.save(tmp_path / "split.json")
    loaded = Split.load(tmp_path / "split.json")
    assert loaded == s and loaded.fingerprint == "abc123"
    assert loaded.side("test") == s.test and loaded.side("val") == s.val and loaded.side("train") == s.train
    with pytest.raises(ValueError, match="train, val or test"):
        s.side("all")


@pytest.mark.parametrize("n", [0, 1, 2])
def test_too_few_patients(n):
    with pytest.raises(ValueError, match=f"at least 3 patients.*found {n}"):
        make_split(PATIENTS[:n])
    with pytest.raises(ValueError, match="found 2"):
        make_split(["a", "b", "a", "b"])


@pytest.mark.parametrize("test_fraction, val_fraction", [(0, 0.1), (1, 0.1), (0.2, 0), (0.2, 1), (-0.1, 0.1),
                                                         (0.5, 0.5), (0.7, 0.4), (float("nan"), 0.1)])
def test_bad_fractions(test_fraction, val_fraction):
    with pytest.raises(ValueError, match=r"fractions must each be in \(0, 1\)"):
        make_split(PATIENTS, test_fraction, val_fraction)
