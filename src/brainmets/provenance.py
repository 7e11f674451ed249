"""What made a mask: a loaded model's fingerprint over everything that can change the mask it writes.

    fingerprint(predictor, tta, register) -> Fingerprint
    .version   '<model>-<12 hex digits>': in summary.csv, provenance.json, API answers, the DICOM SEG's algorithm
               version and series description (its UIDs derive from it), the PACS watch's record of done studies
    .parts()   what it is made of, for provenance.json and the API's `model_provenance`

The parts: each checkpoint's SHA-256 (retraining), the post-processing as it runs (threshold, smallest lesions,
lesion mode: a retune, `--lesion-mode` or `evaluate --threshold`), TTA, the study alignment setting (`register`;
None where no study is read: slices, preprocessed arrays), each network's runtime and precision (the device is
in the runtime: `torch-cuda`), and the brainmets version. The model's name and path are not: the same weights
with the same settings make the same masks wherever the file lies (the name only prefixes `version`). The batch
size, the number of threads and workers, and Ray are not either: tests/test_provenance.py and tests/test_ray.py
show the masks are the same whatever they are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from brainmets import __version__
from brainmets.registry import CANDIDATES

DIGITS = 12  # of the digest in `version`: 48 bits, and '<name>-<digits>' fits a SeriesDescription (64 characters)


@dataclass(frozen=True)
class Fingerprint:
    model: str  # a shipped name or `ensemble` (`best` resolved), else `checkpoint`
    networks: list[dict[str, str]]  # each network in order: architecture, checkpoint SHA-256, runtime, precision
    post: dict[str, Any]  # PostprocessConfig as it runs
    tta: bool
    register: str | None  # auto | on | off; None where no study is read
    brainmets: str

    def parts(self) -> dict[str, Any]:
        """Everything the digest is taken over."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "model"}

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.parts(), sort_keys=True).encode()).hexdigest()

    @property
    def version(self) -> str:
        return f"{self.model}-{self.digest[:DIGITS]}"

    def record(self) -> dict[str, Any]:
        """version, digest and parts, as provenance.json and the API's answers hold them."""
        return {"version": self.version, "model": self.model, "digest": self.digest, **self.parts()}


def fingerprint(predictor, tta: bool = False, register: str | None = None) -> Fingerprint:
    """The fingerprint of `predictor` (a loaded `brainmets.inference.Predictor`) run with these settings; the
    checkpoints' hashes are those the engine computed when it read them."""
    return Fingerprint(
        model=predictor.name if predictor.name in CANDIDATES else "checkpoint",
        networks=[{"network": n.cfg.model.name, "sha256": n.sha256, "runtime": n.runtime, "precision": n.precision}
                  for n in predictor.networks],
        post=dataclasses.asdict(predictor.post), tta=bool(tta), register=register, brainmets=__version__)
