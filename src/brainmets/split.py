"""Split patients, never slices: train / validation / test, seeded and written to split.json.

Validation patients come out of the training side; model selection and early stopping look only at
them, so the test patients stay unseen until evaluation.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Split:
    train: list[str]
    val: list[str]
    test: list[str]
    seed: int
    test_fraction: float
    val_fraction: float
    fingerprint: str  # of the dataset the split was made on

    def side(self, name: str) -> list[str]:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split side {name!r}; expected train, val or test")
        return getattr(self, name)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Split:
        return cls(**json.loads(Path(path).read_text()))


def make_split(patients: list[str], test_fraction: float = 0.2, val_fraction: float = 0.1,
               seed: int = 0, fingerprint: str = "") -> Split:
    """Shuffle the sorted patient ids with `seed`; the first go to test, the next to validation.

    Fractions are of all patients; each side gets at least one patient.
    """
    ids = sorted(set(patients))
    if len(ids) < 3:
        raise ValueError(f"need at least 3 patients to split into train, validation and test; found {len(ids)}")
    if not (0 < test_fraction < 1 and 0 < val_fraction < 1 and test_fraction + val_fraction < 1):
        raise ValueError("test and validation fractions must each be in (0, 1) and sum to less than 1")
    random.Random(seed).shuffle(ids)
    n_test = max(1, round(len(ids) * test_fraction))
    n_val = max(1, round(len(ids) * val_fraction))
    if n_test + n_val >= len(ids):
        n_test, n_val = 1, 1
    test, val, train = ids[:n_test], ids[n_test:n_test + n_val], ids[n_test + n_val:]
    return Split(sorted(train), sorted(val), sorted(test), seed, test_fraction, val_fraction, fingerprint)
