"""Train one network on the training patients, select it on the validation patients.

One loop, in stages: seed the epoch -> train on its batches -> validate (per-patient Dice) ->
checkpoint (last, and best on validation) -> log -> stop (epochs done or time budget).

Every epoch reseeds torch, numpy and the augmentation from (seed, epoch), so `--resume` after a crash
replays exactly what an uninterrupted run would have done. Checkpoints are plain dicts of tensors and
primitives, written to a temporary file and renamed, loadable with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from monai.losses import DiceCELoss
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from brainmets.augmentation import train_transform
from brainmets.cache import Arrays
from brainmets.config import TrainConfig
from brainmets.evaluation import validate
from brainmets.models import autocast, build_model
from brainmets.preprocessing import normalize
from brainmets.split import Split

console = Console(stderr=True)


class Slices(Dataset):
    """Augmented (image, mask) pairs: float32 (3, s, s) in [0, 1] and float32 (1, s, s) in {0, 1}.

    The augmentation of item i is seeded from (seed, i), not drawn from a running stream, so it is the
    same whichever process or loader worker fetches the item.
    """

    def __init__(self, arrays: Arrays, rows: list[int], transform: Callable, seed: tuple[int, ...] = (0,)):
        self.arrays, self.rows, self.transform, self.seed = arrays, rows, transform, seed

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.rows[i]
        self.transform.set_random_seed(int(np.random.SeedSequence([*self.seed, i]).generate_state(1)[0]))
        out = self.transform(image=np.asarray(self.arrays.images[row]), mask=np.asarray(self.arrays.masks[row]))
        return torch.from_numpy(normalize(out["image"])), torch.from_numpy(out["mask"][None].astype(np.float32))


def epoch_rows(arrays: Arrays, patients: list[str], empty_fraction: float, rng: np.random.Generator) -> list[int]:
    """Every lesion slice of the patients, plus a random `empty_fraction` of their empty slices, shuffled."""
    rows = np.array([i for p in patients for i in arrays.rows(p)], dtype=np.int64)
    has_lesion = np.asarray(arrays.masks[rows]).reshape(len(rows), -1).any(axis=1) if len(rows) else np.zeros(0, bool)
    empty = rows[~has_lesion]
    keep = rng.choice(empty, size=int(round(len(empty) * empty_fraction)), replace=False) if len(empty) else empty
    chosen = np.concatenate([rows[has_lesion], keep])
    rng.shuffle(chosen)
    return chosen.tolist()


def distributed() -> tuple[int, int, int]:
    """(rank, local rank, world size) under torchrun, which sets these variables; (0, 0, 1) otherwise.

    Joins the process group once: nccl for GPU tensors where there is a GPU, gloo for the CPU tensors of
    the small agreements (time, stop) and on CPU-only machines.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)  # else every process's collectives land on cuda:0
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), local_rank, world


def make_loss(cfg: TrainConfig) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    if cfg.loss == "bce":
        base: nn.Module = nn.BCEWithLogitsLoss()
    elif cfg.loss == "dice_bce":
        base = DiceCELoss(sigmoid=True, batch=True)  # batch Dice: a crop without lesion is no 0/0
    else:
        raise ValueError(f"unknown loss {cfg.loss!r}; expected bce or dice_bce")

    def loss(output: torch.Tensor | list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        outputs = output if isinstance(output, list) else [output]
        return sum(base(o.float(), target) for o in outputs) / len(outputs)

    return loss


def learning_rate(cfg: TrainConfig, progress: float) -> float:
    """The rate at `progress` (0 at the start, 1 at the end) of the run."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "cosine":
        return float(cfg.lr * 0.5 * (1 + np.cos(np.pi * min(1.0, progress))))
    raise ValueError(f"unknown lr schedule {cfg.lr_schedule!r}; expected constant or cosine")


def save_atomic(obj: Any, path: Path) -> None:
    """Write to a temporary file, then rename: a crash or a full disk leaves the previous file whole."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a failed write (ENOSPC) as a RuntimeError
        raise OSError(f"cannot write checkpoint {path} ({e}); is the disk full? The previous "
                      f"{path.name} is untouched") from e
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's dict; never unpickles code (weights_only), so a hostile file cannot run anything."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not a readable brainmets checkpoint ({str(e).splitlines()[0]})") from e


def model_from_checkpoint(ckpt: dict[str, Any]) -> tuple[nn.Module, TrainConfig]:
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = build_model(cfg.model)
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as e:
        raise OSError(f"cannot write to output folder {out}: {e.strerror or e}") from e


def train(cfg: TrainConfig, arrays: Arrays, split: Split, out: Path, resume: bool = False,
          progress: bool = True) -> dict[str, Any]:
    """Train to `out/` (last.pt, best.pt, config.json, split.json, log.jsonl); return the best checkpoint's
    summary."""
    out = Path(out)
    rank, local_rank, world = distributed()
    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} is the global batch and must divide among {world} processes")
    lead = rank == 0  # only the first process validates and writes
    if lead:
        check_writable(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)  # the initial weights
    model = build_model(cfg.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_epoch, best, history = 0, -1.0, []
    if resume:
        last = out / "last.pt"
        if not last.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {last}")
        for stale in out.glob(".*.tmp-*"):  # left by a writer killed mid-write; never read
            stale.unlink(missing_ok=True)
        ckpt = load_checkpoint(last)
        saved = TrainConfig.from_dict(ckpt["config"])
        if saved.model != cfg.model:
            raise ValueError(f"--resume: {last} holds a {saved.model}, not the requested {cfg.model}")
        # The run continues with the settings it started with; only the time budget is the new one.
        cfg = dataclasses.replace(saved, time_budget_min=cfg.time_budget_min)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, best, history = ckpt["epoch"], ckpt["best_val_dice"], ckpt["history"]
        if lead:
            console.print(f"resuming {out} at epoch {start_epoch + 1} (best validation Dice {best:.4f})")
    side = arrays.images.shape[1]
    if side != cfg.preprocess.image_size:  # the saved config would then describe another model than trained
        raise ValueError(f"the data was preprocessed to {side}-px slices but the run trains on "
                         f"{cfg.preprocess.image_size} px" + (" (set when it started)" if resume else ""))
    if lead:
        cfg.save(out / "config.json")
        split.save(out / "split.json")
    model = model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    if world > 1:
        # MONAI's U-Net++ builds its deep-supervision heads even when it does not use them.
        unused = cfg.model.name == "unetpp" and not cfg.model.deep_supervision
        model = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None,
                                        find_unused_parameters=unused)
    loss_fn = make_loss(cfg)
    transform = train_transform(cfg)
    started, elapsed_before = time.monotonic(), sum(h["seconds"] for h in history)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=console, disable=not (progress and lead)) as bar:
        epochs_task = bar.add_task(f"{cfg.name} epochs", total=cfg.epochs, completed=start_epoch, info="")
        for epoch in range(start_epoch, cfg.epochs):
            # Stop before an epoch that would not fit the time budget, so every checkpoint is a whole epoch.
            spent = _max_across(elapsed_before + time.monotonic() - started, world)
            per_epoch = spent / max(1, epoch) if epoch else 0.0
            budget = cfg.time_budget_min * 60 if cfg.time_budget_min is not None else None
            if budget is not None and spent + per_epoch > budget:
                if lead:
                    console.print(f"time budget of {cfg.time_budget_min} min reached after {epoch} epochs")
                break
            t0 = time.monotonic()
            # seed the epoch
            torch.manual_seed(cfg.seed * 1000 + epoch)
            rng = np.random.default_rng([cfg.seed, epoch])
            rows = epoch_rows(arrays, split.train, cfg.empty_fraction, rng)
            # Every process draws the same rows; the sampler deals them out, so that the k-th batches of
            # all processes together are the k-th batch of a single process with the global batch size.
            slices = Slices(arrays, rows, transform, seed=(cfg.seed, epoch))
            sampler = DistributedSampler(slices, world, rank, shuffle=False, drop_last=True) if world > 1 else None
            loader = DataLoader(slices, batch_size=cfg.batch_size // world, shuffle=False, sampler=sampler,
                                drop_last=len(rows) > cfg.batch_size, num_workers=cfg.num_workers)
            # With a time budget the schedule ends with whichever runs out first, epochs or time, so a
            # run cut short by the clock still anneals.
            lr = learning_rate(cfg, max(epoch / cfg.epochs, spent / budget if budget else 0.0))
            for group in optimizer.param_groups:
                group["lr"] = lr
            # train
            model.train()
            losses = []
            batch_task = bar.add_task(f"epoch {epoch + 1}", total=len(loader), info="")
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(cfg.bf16, device.type):
                    output = model(x)
                loss = loss_fn(output, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(_mean_across(loss.detach(), world))
                bar.update(batch_task, advance=1, info=f"loss {np.mean(losses[-20:]):.4f}")
            bar.remove_task(batch_task)
            train_seconds = time.monotonic() - t0
            # validate (first process; the others wait for its verdict)
            val = validate(_plain(model), arrays, split.val, cfg.post, bf16=cfg.bf16) if lead else None
            if world > 1:
                shared = [val]
                dist.broadcast_object_list(shared, src=0)
                val = shared[0]
            val_dice = val["dice_per_patient_mean"]
            record = {"epoch": epoch + 1, "lr": lr, "train_loss": float(np.mean(losses)), "val_dice": val_dice,
                      "val_dice_pooled": val["dice_pooled"], "images": len(rows), "processes": world,
                      "seconds": time.monotonic() - t0, "images_per_s": len(rows) / train_seconds}
            history.append(record)
            # checkpoint
            state = {"model": _plain(model).state_dict(), "config": cfg.to_dict(), "epoch": epoch + 1,
                     "best_val_dice": max(best, val_dice), "history": history, "split": dataclasses.asdict(split)}
            improved = val_dice > best
            best = max(best, val_dice)
            if not lead:
                continue
            if improved:
                save_atomic(state, out / "best.pt")
            save_atomic({**state, "optimizer": optimizer.state_dict()}, out / "last.pt")
            # log: rewritten whole from the checkpoint's history, so the two always agree
            write_atomic(out / "log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
            bar.update(epochs_task, advance=1,
                       info=f"loss {record['train_loss']:.4f} val Dice {val_dice:.4f} (best {best:.4f})")
            console.print(f"epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.4f}, validation "
                          f"per-patient Dice {val_dice:.4f}, {record['seconds']:.0f} s, "
                          f"{record['images_per_s']:.1f} img/s")
    return {"best_val_dice": best, "epochs": len(history), "seconds": sum(h["seconds"] for h in history)}


def _mean_across(value: torch.Tensor, world: int) -> float:
    if world > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world
    return value.item()


def _max_across(value: float, world: int) -> float:
    """The largest of the processes' values, so that all take the same decision (stop, learning rate)."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _plain(model: nn.Module) -> nn.Module:
    """The model itself, unwrapped from DistributedDataParallel where it is wrapped."""
    return getattr(model, "module", model)
