"""Train one network on the training patients, select it on the validation patients.

One loop, in stages: seed the epoch -> train on its batches -> validate (per-patient Dice) ->
checkpoint (last, and best on validation) -> log -> stop (epochs done or time budget).

Every epoch reseeds torch, numpy and the augmentation from (seed, epoch), so `--resume` after a crash
replays exactly what an uninterrupted run would have done. Checkpoints are plain dicts of tensors and
primitives, written whole or not at all (`brainmets.checkpoints`).
"""

from __future__ import annotations

import dataclasses
import json
import os
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
from brainmets.checkpoints import (check_writable, load_checkpoint, load_hashed_checkpoint, save_atomic,
                                   sweep_temporaries, write_atomic)
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


def step_seconds(cfg: TrainConfig, crop: int, batch: int, repeats: int = 5) -> float:
    """Median seconds of one training step (forward, backward, Adam) of `cfg`'s network and precision on a
    random batch: the speed of the arithmetic alone, without data loading, on this machine now."""
    model = build_model(cfg.model).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = make_loss(cfg)
    x, y = torch.rand(batch, 3, crop, crop), (torch.rand(batch, 1, crop, crop) > 0.9).float()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    for i in range(repeats + 1):  # the first step warms up allocators and kernels
        t0 = time.monotonic()
        with autocast(cfg.bf16):
            out = model(x)
        loss = loss_fn(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.monotonic() - t0)
    return float(np.median(times))


def idle_images_per_s(cfg: TrainConfig) -> float:
    """The run's own step on random data, timed before it starts: the reference its images/s is logged
    against, since shared machines run 2-15x slower at times and an old benchmark says nothing of now."""
    return cfg.batch_size / step_seconds(cfg, cfg.crop_size or cfg.preprocess.image_size, cfg.batch_size)


def train(cfg: TrainConfig, arrays: Arrays, split: Split, out: Path, resume: bool = False,
          progress: bool = True) -> dict[str, Any]:
    """Train to `out/` (last.pt, best.pt, config.json, split.json, log.jsonl); return the best checkpoint's
    summary."""
    out = Path(out)
    rank, local_rank, world = distributed()
    lead = rank == 0  # only the first process validates and writes
    device = _prepare(cfg, out, world, local_rank, lead)
    torch.manual_seed(cfg.seed)  # the initial weights
    model = build_model(cfg.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_epoch, best, history = 0, -1.0, []
    if resume:
        cfg, start_epoch, best, history = _resume(out, cfg, model, optimizer, lead)
    elif cfg.init_from:
        cfg = _init_weights(model, cfg, lead)
    benchmarks: dict[int | None, float | None] = {}  # crop size -> idle images/s of that step

    def idle_for(phase: TrainConfig) -> float | None:
        if phase.crop_size not in benchmarks:
            benchmarks[phase.crop_size] = idle_images_per_s(phase) if device.type == "cpu" else None
            if lead and benchmarks[phase.crop_size]:
                what = f"{phase.crop_size}-px crops" if phase.crop_size else "whole slices"
                console.print(f"idle benchmark of this step on random data ({what}): "
                              f"{benchmarks[phase.crop_size]:.1f} img/s")
        return benchmarks[phase.crop_size]

    idle_for(cfg)
    side = arrays.images.shape[1]
    if side != cfg.preprocess.image_size:  # the saved config would then describe another model than trained
        raise ValueError(f"the data was preprocessed to {side}-px slices but the run trains on "
                         f"{cfg.preprocess.image_size} px" + (" (set when it started)" if resume else ""))
    if lead:
        cfg.save(out / "config.json")
        split.save(out / "split.json")
    model = _placed(model, cfg, device, local_rank, world)
    loss_fn = make_loss(cfg)
    started, elapsed_before = time.monotonic(), sum(h["seconds"] for h in history)

    with _progress_bar(progress and lead) as bar:
        epochs_task = bar.add_task(f"{cfg.name} epochs", total=cfg.epochs, completed=start_epoch, info="")
        for epoch in range(start_epoch, cfg.epochs):
            # stop before an epoch that would not fit the time budget, so every checkpoint is a whole epoch
            spent = _max_across(elapsed_before + time.monotonic() - started, world)
            if _over_budget(cfg, epoch, spent, history[-1]["seconds"] if history else 0.0):
                if lead:
                    console.print(f"time budget of {cfg.time_budget_min} min reached after {epoch} epochs")
                break
            phase = _phase(cfg, epoch, spent)
            idle = idle_for(phase)
            t0 = time.monotonic()
            # seed the epoch, then set its learning rate
            loader, images = _epoch_loader(phase, arrays, split, train_transform(phase), epoch, rank, world)
            lr = learning_rate(cfg, _run_progress(cfg, epoch, spent))
            for group in optimizer.param_groups:
                group["lr"] = lr
            # train
            losses = _train_epoch(model, loader, optimizer, loss_fn, cfg, device, world, bar, epoch)
            train_seconds = time.monotonic() - t0
            record = {"epoch": epoch + 1, "lr": lr, "train_loss": float(np.mean(losses)), "images": images,
                      "processes": world, "crop": phase.crop_size or side, "images_per_s": images / train_seconds,
                      "idle_images_per_s": idle}
            # validate (first process; the others wait for its verdict) every val_every-th epoch and the one
            # foreseen as the last
            spent = _max_across(elapsed_before + time.monotonic() - started, world)
            scored = ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs
                      or _over_budget(cfg, epoch + 1, spent, time.monotonic() - t0))
            if scored:
                _score(record, model, cfg, arrays, split, lead, world)
            record["seconds"] = time.monotonic() - t0
            history.append(record)
            best = _log_epoch(out, model, optimizer, cfg, split, history, best, lead, bar, epochs_task, idle)
        if history and "val_dice" not in history[-1]:  # the clock ran out sooner than foreseen
            t0 = time.monotonic()
            _score(history[-1], model, cfg, arrays, split, lead, world)
            history[-1]["seconds"] += time.monotonic() - t0
            best = _log_epoch(out, model, optimizer, cfg, split, history, best, lead, bar, epochs_task,
                              history[-1]["idle_images_per_s"], advance=0)
    return {"best_val_dice": best, "epochs": len(history), "seconds": sum(h["seconds"] for h in history)}


def _score(record: dict, model: nn.Module, cfg: TrainConfig, arrays: Arrays, split: Split, lead: bool,
           world: int) -> None:
    val = _validate(model, cfg, arrays, split, lead, world)
    record.update(val_dice=val["dice_per_patient_mean"], val_dice_pooled=val["dice_pooled"])


def _log_epoch(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, split: Split,
               history: list[dict], best: float, lead: bool, bar: Progress, task: Any, idle: float | None,
               advance: int = 1) -> float:
    """Checkpoint the epoch that `history` ends with (best.pt if its validation improved) and report it;
    the best validation Dice so far."""
    record = history[-1]
    improved = record.get("val_dice", -1.0) > best
    best = max(best, record.get("val_dice", -1.0))
    if not lead:
        return best
    _checkpoint(out, model, optimizer, cfg, split, history, best, improved)
    val = (f"validation per-patient Dice {record['val_dice']:.4f}, " if "val_dice" in record else "")
    bar.update(task, advance=advance, info=f"loss {record['train_loss']:.4f} best val Dice {best:.4f}")
    speed = f" ({record['images_per_s'] / idle:.0%} of idle)" if idle else ""
    console.print(f"epoch {record['epoch']}/{cfg.epochs}: loss {record['train_loss']:.4f}, {val}"
                  f"{record['seconds']:.0f} s, {record['images_per_s']:.1f} img/s{speed}")
    return best


def _prepare(cfg: TrainConfig, out: Path, world: int, local_rank: int, lead: bool) -> torch.device:
    """Check the settings and the output folder before any work; set threads; the device to train on."""
    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} is the global batch and must divide among {world} processes")
    if lead:
        check_writable(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")


def _resume(out: Path, cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
            lead: bool) -> tuple[TrainConfig, int, float, list[dict]]:
    """Load `out/last.pt` into the model and optimizer: (the run's config, next epoch, best Dice, history)."""
    last = out / "last.pt"
    if not last.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {last}")
    sweep_temporaries(out)
    ckpt = load_checkpoint(last)
    saved = TrainConfig.from_dict(ckpt["config"])
    if saved.model != cfg.model:
        raise ValueError(f"--resume: {last} holds a {saved.model}, not the requested {cfg.model}")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if lead:
        console.print(f"resuming {out} at epoch {ckpt['epoch'] + 1} (best validation Dice {ckpt['best_val_dice']:.4f})")
        _write_log(out, ckpt["history"])  # a kill between last.pt's rename and the log's left it an epoch short
    # The run continues with the settings it started with; only the time budget is the new one.
    return (dataclasses.replace(saved, time_budget_min=cfg.time_budget_min), ckpt["epoch"], ckpt["best_val_dice"],
            ckpt["history"])


def _init_weights(model: nn.Module, cfg: TrainConfig, lead: bool) -> TrainConfig:
    """Start from `cfg.init_from`'s weights; its network must be the one configured (deep supervision aside:
    MONAI's U-Net++ has the same weights with it or without). The config comes back with the file's sha256,
    which still names those weights once the path holds others (a fine-tuned model shipped over its source)."""
    path = Path(cfg.init_from)
    ckpt, sha256 = load_hashed_checkpoint(path)
    saved = TrainConfig.from_dict(ckpt["config"]).model
    if dataclasses.replace(saved, deep_supervision=cfg.model.deep_supervision) != cfg.model:
        raise ValueError(f"--init-from: {cfg.init_from} holds {saved.name} of widths {list(saved.widths)}, "
                         f"not the requested {cfg.model.name} of widths {list(cfg.model.widths)}")
    model.load_state_dict(ckpt["model"])
    if lead:
        console.print(f"starting from the weights of {cfg.init_from} (epoch {ckpt.get('epoch', '?')})")
    return dataclasses.replace(cfg, init_sha256=sha256)


def _placed(model: nn.Module, cfg: TrainConfig, device: torch.device, local_rank: int, world: int) -> nn.Module:
    """The model on its device, in its memory format, wrapped for data parallelism under torchrun."""
    model = model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    if world == 1:
        return model
    # MONAI's U-Net++ builds its deep-supervision heads even when it does not use them.
    unused = cfg.model.name == "unetpp" and not cfg.model.deep_supervision
    return DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None,
                                   find_unused_parameters=unused)


def _progress_bar(enabled: bool) -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[info]}"))
    return Progress(*columns, console=console, disable=not enabled)


def _budget_s(cfg: TrainConfig) -> float | None:
    return cfg.time_budget_min * 60 if cfg.time_budget_min is not None else None


def _over_budget(cfg: TrainConfig, epoch: int, spent: float, last: float = 0.0) -> bool:
    """Would one more epoch, as long as the average one so far or the `last` one if that was longer,
    overrun the time budget? (A whole-slice epoch is several crop epochs long.)"""
    budget = _budget_s(cfg)
    per_epoch = max(spent / max(1, epoch) if epoch else 0.0, last)
    return budget is not None and spent + per_epoch > budget


def _phase(cfg: TrainConfig, epoch: int, spent: float) -> TrainConfig:
    """The settings of the epoch: in the run's last `whole_slice_phase`, whole slices and every empty slice,
    so the network ends on the distribution it serves; crops before."""
    if cfg.whole_slice_phase and _run_progress(cfg, epoch, spent) >= 1 - cfg.whole_slice_phase:
        return dataclasses.replace(cfg, crop_size=None, empty_fraction=1.0)
    return cfg


def _run_progress(cfg: TrainConfig, epoch: int, spent: float) -> float:
    """How far through the run: with a time budget, whichever runs out first, epochs or time, so a run cut
    short by the clock still anneals."""
    budget = _budget_s(cfg)
    return max(epoch / cfg.epochs, spent / budget if budget else 0.0)


def _epoch_loader(cfg: TrainConfig, arrays: Arrays, split: Split, transform: Callable, epoch: int, rank: int,
                  world: int) -> tuple[DataLoader, int]:
    """The epoch's batches for this process, and the number of images in the epoch (all processes)."""
    torch.manual_seed(cfg.seed * 1000 + epoch)
    rng = np.random.default_rng([cfg.seed, epoch])
    rows = epoch_rows(arrays, split.train, cfg.empty_fraction, rng)
    # Every process draws the same rows; the sampler deals them out, so that the k-th batches of all
    # processes together are the k-th batch of a single process with the global batch size.
    slices = Slices(arrays, rows, transform, seed=(cfg.seed, epoch))
    sampler = DistributedSampler(slices, world, rank, shuffle=False, drop_last=True) if world > 1 else None
    loader = DataLoader(slices, batch_size=cfg.batch_size // world, shuffle=False, sampler=sampler,
                        drop_last=len(rows) > cfg.batch_size, num_workers=cfg.num_workers)
    return loader, len(rows)


def _train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, loss_fn: Callable,
                 cfg: TrainConfig, device: torch.device, world: int, bar: Progress, epoch: int) -> list[float]:
    """One pass over the loader: the loss of every step, averaged over the processes."""
    model.train()
    losses = []
    task = bar.add_task(f"epoch {epoch + 1}", total=len(loader), info="")
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
        bar.update(task, advance=1, info=f"loss {np.mean(losses[-20:]):.4f}")
    bar.remove_task(task)
    return losses


def _validate(model: nn.Module, cfg: TrainConfig, arrays: Arrays, split: Split, lead: bool,
              world: int) -> dict[str, Any]:
    """The validation report, computed by the first process and shared with the others."""
    val = validate(_plain(model), arrays, split.val, cfg.post, bf16=cfg.bf16) if lead else None
    if world > 1:
        shared = [val]
        dist.broadcast_object_list(shared, src=0)
        val = shared[0]
    return val


def _checkpoint(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, split: Split,
                history: list[dict], best: float, improved: bool) -> None:
    """best.pt when the epoch improved, last.pt (with the optimizer) always, then the log, rewritten whole
    from the checkpoint's history. last.pt is the record: two files cannot be renamed at once, so a kill
    between the renames leaves the log one epoch behind until `--resume` rewrites it from last.pt."""
    state = {"model": _plain(model).state_dict(), "config": cfg.to_dict(), "epoch": history[-1]["epoch"],
             "best_val_dice": best, "history": history, "split": dataclasses.asdict(split)}
    if improved:
        save_atomic(state, out / "best.pt")
    save_atomic({**state, "optimizer": optimizer.state_dict()}, out / "last.pt")
    _write_log(out, history)


def _write_log(out: Path, history: list[dict]) -> None:
    write_atomic(out / "log.jsonl", "".join(json.dumps(h) + "\n" for h in history))


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
