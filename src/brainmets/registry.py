"""Model names -> checkpoint files. Requests name models; only this fixed mapping turns names into paths.

Shipped models live in `models/<name>/` (override with `$BRAINMETS_MODELS`): `model.pt`, `model.onnx`,
`config.json`, `split.json`, `log.jsonl`, `metrics.json` (test evaluation) and `MODEL_CARD.md`.
`best` is the shipped model with the higher test per-patient Dice in its `metrics.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from brainmets.config import MODEL_NAMES, NETWORKS

SHIPPED = MODEL_NAMES
BEST = "best"
ENSEMBLE = "ensemble"
CHOICES = (BEST, *SHIPPED, ENSEMBLE)  # every model name a request, the command line or the page may give


def title(name: str) -> str:
    """How the page names a model."""
    if name == ENSEMBLE:
        return f"Ensemble (mean of {' and '.join(NETWORKS[n].title for n in SHIPPED)})"
    return NETWORKS[name].title if name in NETWORKS else name


def models_dir() -> Path:
    return Path(os.environ.get("BRAINMETS_MODELS", Path(__file__).resolve().parents[2] / "models"))


def shipped_metrics(name: str) -> dict | None:
    path = models_dir() / name / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else None


def best_name() -> str:
    scored = [(m["dice_per_patient_mean"], n) for n in SHIPPED if (m := shipped_metrics(n))]
    if not scored:
        raise FileNotFoundError(f"no shipped model with metrics.json under {models_dir()}")
    return max(scored)[1]


def resolve(name_or_path: str | Path) -> Path:
    """A shipped name (`unetpp`, `attention-unet`, `best`), a checkpoint file, or a training run folder."""
    name = str(name_or_path)
    if name == BEST:
        name = best_name()
    if name in SHIPPED:
        path = models_dir() / name / "model.pt"
        if not path.exists():
            raise FileNotFoundError(f"shipped model {name!r} not found at {path}")
        return path
    path = Path(name_or_path)
    if path.is_dir():
        for candidate in ("best.pt", "model.pt"):
            if (path / candidate).exists():
                return path / candidate
        raise FileNotFoundError(f"{path}: no best.pt or model.pt in this folder")
    if path.is_file():
        return path
    raise FileNotFoundError(f"unknown model {name!r}: expected {', '.join(SHIPPED)}, best, a .pt checkpoint "
                            f"or a training run folder")
