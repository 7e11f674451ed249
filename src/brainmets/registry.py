"""Model names -> files. Requests name models; only this fixed mapping turns names into paths.

Shipped models live in `models/<name>/` (override with `$BRAINMETS_MODELS`): `model.pt`, `model.onnx`,
`config.json`, `split.json`, `log.jsonl`, `metrics.json` (validation and test evaluation) and `MODEL_CARD.md`.
`models/ensemble/` holds the ensemble's post-processing (`postprocess.json`, tuned on validation) and its
metrics. `best` is whichever of the networks and the ensemble scored the higher per-patient Dice on the
**validation** patients: the test patients are never used to choose.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from brainmets.config import MODEL_NAMES, NETWORKS, PostprocessConfig

SHIPPED = MODEL_NAMES
BEST = "best"
ENSEMBLE = "ensemble"
CANDIDATES = (*SHIPPED, ENSEMBLE)  # what `best` may stand for
CHOICES = (BEST, *CANDIDATES)  # every model name a request, the command line or the page may give


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


def ensemble_post() -> PostprocessConfig | None:
    """The ensemble's post-processing as tuned on validation, None where it was never tuned."""
    path = models_dir() / ENSEMBLE / "postprocess.json"
    return PostprocessConfig(**json.loads(path.read_text())) if path.exists() else None


def tuned_post(name_or_path: str | Path, mode: str) -> PostprocessConfig | None:
    """The post-processing tuned on validation for this lesion mode (`metrics.json` beside the model keeps both
    modes' best settings), None where the model was never tuned."""
    name = str(name_or_path)
    path = models_dir() / name if name in CANDIDATES else Path(name_or_path)
    metrics = (path if path.is_dir() else path.parent) / "metrics.json"
    if not metrics.is_file():
        return None
    tuning = json.loads(metrics.read_text()).get("validation_tuning", {}).get("modes", {})
    return PostprocessConfig(**tuning[mode]["post"]) if mode in tuning else None


def validation_dice(name: str) -> float | None:
    metrics = shipped_metrics(name)
    return metrics["validation"]["dice_per_patient_mean"] if metrics and "validation" in metrics else None


def best_name() -> str:
    """The candidate with the highest validation per-patient Dice; the ensemble only when both networks are here."""
    available = [n for n in SHIPPED if (models_dir() / n / "model.pt").is_file()]
    candidates = available + ([ENSEMBLE] if len(available) == len(SHIPPED) else [])
    scored = [(d, n) for n in candidates if (d := validation_dice(n)) is not None]
    if not scored:
        raise FileNotFoundError(f"no shipped model with a validation score in metrics.json under {models_dir()}")
    return max(scored)[1]


def resolve_init(name_or_path: str | Path, network: str) -> tuple[Path, str | None]:
    """`--init-from` of a run training `network`: the checkpoint to start from, and a note when a name stood for
    something else. `best` (or `ensemble`) standing for the ensemble starts from its member of that network;
    `best` standing for the other network is refused, naming what to give instead."""
    name = str(name_or_path)
    if name not in (BEST, ENSEMBLE):
        return resolve(name_or_path), None
    chosen = best_name() if name == BEST else ENSEMBLE
    if chosen == ENSEMBLE:
        if network not in SHIPPED:
            raise ValueError(f"--init-from {name}: the ensemble's members are {', '.join(SHIPPED)}, not {network}")
        return resolve(network), f"{name} is the ensemble: starting from its {network} member ({resolve(network)})"
    if chosen != network:
        raise ValueError(f"--init-from {name}: the best shipped model is {chosen} (on validation), not the {network} "
                         f"being trained; give --init-from {network}, or train --model {chosen}")
    return resolve(chosen), None


@dataclass(frozen=True)
class Model:
    """What a model name or path stands for: the checkpoints to load, and the post-processing that goes with them
    (the ensemble's, tuned on validation; None: each network's own, from its checkpoint)."""

    name: str  # `best` resolved: a shipped network, `ensemble`, or the path given
    checkpoints: tuple[Path, ...]
    post: PostprocessConfig | None = None


def model(name_or_path: str | Path) -> Model:
    """`best`, `ensemble`, a shipped network's name, a checkpoint or a run folder: the one place a model name
    becomes files, for every entry point (command line, API, page, batch, PACS)."""
    name = best_name() if str(name_or_path) == BEST else str(name_or_path)
    if name == ENSEMBLE:
        return Model(ENSEMBLE, tuple(resolve(n) for n in SHIPPED), ensemble_post())
    return Model(name, (resolve(name),))


def resolve(name_or_path: str | Path) -> Path:
    """A shipped network's name, a checkpoint file, or a training run folder -> the checkpoint."""
    name = str(name_or_path)
    if name == BEST:
        name = best_name()
    if name == ENSEMBLE:
        raise FileNotFoundError("the ensemble averages two checkpoints; name one network (or a checkpoint) here")
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
    raise FileNotFoundError(f"unknown model {name!r}: expected {', '.join(CANDIDATES)}, best, a .pt checkpoint "
                            f"or a training run folder")
