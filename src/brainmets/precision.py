"""Which precision a network runs in on this machine, and why: agreement measured once where the data is, speed
measured once per machine.

    agreement  at ship time, on the test patients: bf16 masks against f32, per-patient Dice, recorded in the
               `metrics.json` beside the checkpoint (`brainmets.shipping.precision_agreement`). A bf16 whose masks
               disagree on some patient (Dice < AGREEMENT_DICE) is never chosen by `auto`.
    speed      on a network's first load on a machine: f32 and bf16 timed interleaved on a small batch, the faster
               kept, remembered in `$BRAINMETS_CACHE/openvino/precision-<checkpoint sha256>.json` beside OpenVINO's
               compiled models with the CPU, cores, threads and OpenVINO version it holds for. An entry that does
               not parse or holds for another machine is measured again (a log line says so), never trusted.

`BRAINMETS_PRECISION` (or `precision=`) f32 or bf16 forces one; auto, the default, chooses as above.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "f32")
PRECISION_ENV = "BRAINMETS_PRECISION"
AGREEMENT_DICE = 0.99  # bf16 masks agreeing less than this with f32's on a test patient: bf16 is not offered
# The record's key in metrics.json: {"checkpoint_sha256": ..., "bf16_dice_vs_f32": {patient: Dice}}
AGREEMENT_KEY = "precision_agreement"
# A cold measurement: one warm-up and 3 timed passes of 2 slices per precision, interleaved so that a neighbour's
# load falls on both alike; a second or two at 256², paid by one start per machine and network.
TIMED_SLICES, TIMED_ROUNDS = 2, 3

Forward = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Choice:
    precision: str  # "bf16" or "f32"
    reason: str  # why, for /v1/models and the command line's first line


def requested_precision(precision: str | None = None) -> str:
    """`precision`, else $BRAINMETS_PRECISION, else auto; an unknown value is an error at once."""
    precision = precision or os.environ.get(PRECISION_ENV) or "auto"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (--precision or {PRECISION_ENV}); "
                         f"expected one of {', '.join(PRECISIONS)}")
    return precision


def recorded_agreement(checkpoint: Path, sha256: str) -> float | None:
    """The lowest per-patient Dice of bf16 masks against f32 recorded for these very weights; None if unrecorded."""
    path = Path(checkpoint).parent / "metrics.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text()).get(AGREEMENT_KEY)
        if record is None:
            return None
        if record["checkpoint_sha256"] != sha256:
            log.warning("%s was measured on other weights than %s; ignored", path, checkpoint)
            return None
        return min(float(d) for d in record["bf16_dice_vs_f32"].values())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("%s is unreadable (%s); ignored", path, e)
        return None


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or "unknown CPU")


def machine(threads: int) -> dict:
    """What a speed measurement holds for."""
    import openvino as ov

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_name(), "cores": cores, "threads": threads, "openvino": ov.get_version()}


def time_forwards(forwards: dict[str, Forward], x: np.ndarray) -> dict[str, float]:
    """Median ms of each forward on `x`, after one warm-up each, timed in interleaved rounds."""
    for forward in forwards.values():
        forward(x)
    times: dict[str, list[float]] = {name: [] for name in forwards}
    for _ in range(TIMED_ROUNDS):
        for name, forward in forwards.items():
            t0 = time.perf_counter()
            forward(x)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def speed(sha256: str, threads: int, forwards: Callable[[], dict[str, Forward]], size: int) -> tuple[dict, bool]:
    """This machine's measurement for these weights, from the cache or measured (and cached) now:
    ({cpu, cores, threads, openvino, ms: {precision: ms}}, whether it came from the cache)."""
    from brainmets.cache import cache_root

    path = cache_root() / "openvino" / f"precision-{sha256[:16]}.json"
    here = {**machine(threads), "checkpoint_sha256": sha256}
    if path.is_file():
        try:
            entry = json.loads(path.read_text())
            if {k: entry.get(k) for k in here} == here and set(entry["ms"]) == {"bf16", "f32"}:
                return entry, True
            log.info("%s holds for another machine, OpenVINO or threads; measuring again", path)
        except (ValueError, KeyError, TypeError) as e:
            log.info("%s is unusable (%s); measuring again", path, e)
    rng = np.random.default_rng(0)
    entry = {**here, "ms": time_forwards(forwards(), rng.random((TIMED_SLICES, 3, size, size), np.float32))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(entry, indent=2) + "\n")
    tmp.replace(path)  # atomic: a concurrent start reads the old entry or the new, never half of one
    return entry, False


def choose(requested: str, agreement: float | None, bf16: bool,
           measure: Callable[[], tuple[dict, bool]] | None = None) -> Choice:
    """The precision to run: forced, vetoed by a recorded disagreement, impossible on this hardware (`bf16`
    False), or else the faster as `measure`d; without `measure` (a GPU's autocast) bf16."""
    if requested != "auto":
        return Choice(requested, f"forced by {PRECISION_ENV} / --precision")
    if agreement is not None and agreement < AGREEMENT_DICE:
        return Choice("f32", f"bf16 disagrees with f32 (mask Dice {agreement:.3f} on a test patient)")
    if not bf16:
        return Choice("f32", "CPU has no bf16")
    if measure is None:
        return Choice("bf16", "bf16 autocast")
    entry, cached = measure()
    fast, slow = sorted(entry["ms"], key=entry["ms"].get)
    reason = (f"measured: {fast} {entry['ms'][slow] / entry['ms'][fast]:.2f}x faster than {slow} on {entry['cpu']}, "
              f"{entry['cores']} cores" + (" (cached)" if cached else ""))
    if fast == "bf16" and agreement is None:
        reason += "; bf16 agreement with f32 not recorded for these weights"
    return Choice(fast, reason)
