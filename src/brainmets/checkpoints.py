"""Checkpoints in and out, and every file written whole or not at all.

    load_checkpoint(path)         a checkpoint's dict; never unpickles code (weights_only)
    load_hashed_checkpoint(path)  the same and the sha256 of the bytes it was read from, in one read
    file_sha256(path)             what names a checkpoint's weights wherever the file goes
    model_from_checkpoint(ckpt)   the network in eval mode and the config it was trained with
    save_atomic(obj, path)        torch.save through a temporary file and a rename
    write_atomic(path, data)      the same for text or bytes (logs, masks, summaries)

Checkpoints are plain dicts of tensors and primitives: `model` (state dict), `config`
(`TrainConfig.to_dict()`), `epoch`, `best_val_dice`, `split`; a training run's `last.pt` adds `optimizer`
and `history`. The serving path loads them through this module, never through `training`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brainmets.config import TrainConfig

TMP_MARK = ".tmp-"  # .<name>.tmp-<pid>: hidden, and unique per writing process


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's dict; never unpickles code (weights_only), so a hostile file cannot run anything."""
    return load_hashed_checkpoint(path)[0]


def load_hashed_checkpoint(path: Path) -> tuple[dict[str, Any], str]:
    """A checkpoint's dict and the sha256 of the very bytes it came from: one read, so the name cannot belong
    to other weights than the ones loaded (a file replaced between a load and a second read to hash it)."""
    data = Path(path).read_bytes()
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not a readable brainmets checkpoint ({str(e).splitlines()[0]})") from e
    return ckpt, hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def model_from_checkpoint(ckpt: dict[str, Any]) -> tuple[nn.Module, TrainConfig]:
    # MONAI takes seconds to import; the exported runtimes never need it, so it comes only with a PyTorch model.
    from brainmets.models import build_model

    cfg = TrainConfig.from_dict(ckpt["config"])
    model = build_model(cfg.model)
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` to write to, renamed onto `path` if the block succeeds and removed
    otherwise: a reader, a restart or a crash sees the previous file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sweep_temporaries(folder: Path) -> None:
    """Remove what writers killed mid-write left in `folder` (never read: `replacing` only renames whole files)."""
    for stale in Path(folder).glob(f".*{TMP_MARK}*"):
        stale.unlink(missing_ok=True)


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save, whole or not at all: a crash or a full disk leaves the previous file whole."""
    try:
        with replacing(path) as tmp:
            torch.save(obj, tmp)
    except (OSError, RuntimeError) as e:  # torch reports a failed write (ENOSPC) as a RuntimeError
        raise OSError(f"cannot write checkpoint {path} ({e}); is the disk full? The previous "
                      f"{path.name} is untouched") from e


def write_atomic(path: Path, data: str | bytes) -> None:
    """Text (UTF-8) or bytes, whole or not at all; the parent folder is created."""
    with replacing(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def check_writable(folder: Path) -> None:
    """Create `folder` and prove a file can be written there, before hours of work depend on it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as e:
        raise OSError(f"cannot write to output folder {folder}: {e.strerror or e}") from e
