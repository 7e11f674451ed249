"""Which precision a network runs in on this machine, and how many slices it takes per forward pass, and why:
agreement measured once where the data is, speed measured once per machine.

    agreement  at ship time, on the test patients: bf16 masks against f32, per-patient Dice, recorded in the
               `metrics.json` beside the checkpoint (`brainmets.shipping.precision_agreement`). A bf16 whose masks
               disagree on some patient (Dice < AGREEMENT_DICE) is never chosen by `auto`.
    speed      on a network's first load on a machine: f32 and bf16 timed interleaved on a small batch, the faster
               kept, remembered in `$BRAINMETS_CACHE/openvino/precision-<checkpoint sha256>-<threads>-threads.json`
               beside OpenVINO's compiled models with the CPU, cores, threads and OpenVINO version it holds for. An entry that does
               not parse or holds for another machine is measured again (a log line says so), never trusted.
    batch      then, at the precision it runs, the time per slice at each of BATCH_SIZES slices per forward pass,
               interleaved, the fastest kept; in the same cache entry, beside the precision's timings.

`BRAINMETS_PRECISION` (or `precision=`) f32 or bf16 forces one; auto, the default, chooses as above.
`BRAINMETS_BATCH`, a positive integer, forces the slices per forward pass; unset, they are measured as above.
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
BATCH_ENV = "BRAINMETS_BATCH"
# Slices per forward pass tried on first load (the same warm-up and rounds). On one 2-core AMX Xeon the time per
# slice moved by up to 1.4x between sizes, which size won depended on the network and precision (bf16: 1 always
# slowest, 2-8 fastest; f32: all within 10%), and 16 was the one fixed size before; three sizes keep the
# measurement near a second in bf16.
BATCH_SIZES = (1, 4, 16)

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


def requested_batch() -> int | None:
    """$BRAINMETS_BATCH, else None (measure it); anything but a positive integer is an error at once."""
    value = os.environ.get(BATCH_ENV)
    if not value:
        return None
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"batch {value!r} ({BATCH_ENV}): expected a positive number of slices per forward pass")
    return int(value)


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


def random_slices(n: int, size: int) -> np.ndarray:
    return np.random.default_rng(0).random((n, 3, size, size), np.float32)


def time_interleaved(runs: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median ms of each run, after one warm-up each, timed in interleaved rounds."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(TIMED_ROUNDS):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def time_forwards(forwards: dict[str, Forward], x: np.ndarray) -> dict[str, float]:
    """Median ms of each forward on `x`."""
    return time_interleaved({name: lambda f=forward: f(x) for name, forward in forwards.items()})


def time_batches(forward: Forward, x: np.ndarray) -> dict[int, float]:
    """Median ms per slice of `forward` at each of BATCH_SIZES slices (the first of `x`)."""
    ms = time_interleaved({str(b): lambda b=b: forward(x[:b]) for b in BATCH_SIZES})
    return {b: ms[str(b)] / b for b in BATCH_SIZES}


def measured(sha256: str, threads: int, key: str, usable: Callable[[object], bool],
             measure: Callable[[], object]) -> tuple[dict, bool]:
    """This machine's cache entry for these weights, holding `key`: read from the cache, or `measure`d now and
    added to it (an entry's other measurements for this machine are kept). (entry, whether `key` was cached)."""
    from brainmets.cache import cache_root

    # one file per thread count: a CLI on every core and a server on two would otherwise re-measure over each other
    path = cache_root() / "openvino" / f"precision-{sha256[:16]}-{threads}-threads.json"
    here = {**machine(threads), "checkpoint_sha256": sha256}
    entry = dict(here)
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if {k: cached.get(k) for k in here} != here:
                log.info("%s holds for another machine, OpenVINO or threads; measuring again", path)
            elif key in cached and usable(cached[key]):
                return cached, True
            else:
                entry = cached
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.info("%s is unusable (%s); measuring again", path, e)
    entry[key] = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(entry, indent=2) + "\n")
    tmp.replace(path)  # atomic: a concurrent start reads the old entry or the new, never half of one
    return entry, False


def speed(sha256: str, threads: int, forwards: Callable[[], dict[str, Forward]], size: int) -> tuple[dict, bool]:
    """This machine's precision measurement for these weights, from the cache or measured (and cached) now:
    ({cpu, cores, threads, openvino, ms: {precision: ms}, ...}, whether it came from the cache)."""
    return measured(sha256, threads, "ms", lambda ms: set(ms) == {"bf16", "f32"},
                    lambda: time_forwards(forwards(), random_slices(TIMED_SLICES, size)))


def batch_speed(sha256: str, threads: int, precision: str, forward: Forward, size: int) -> tuple[dict[int, float], bool]:
    """ms per slice at each of BATCH_SIZES for these weights at `precision`, from the cache entry or measured (and
    added to it) now, and whether it came from the cache."""
    key = f"{precision}_ms_per_slice_by_batch"
    entry, cached = measured(sha256, threads, key, lambda ms: {int(b) for b in ms} == set(BATCH_SIZES),
                             lambda: {str(b): ms for b, ms in  # JSON's keys are strings
                                      time_batches(forward, random_slices(max(BATCH_SIZES), size)).items()})
    return {int(b): float(ms) for b, ms in entry[key].items()}, cached


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


def choose_batch(requested: int | None, default: int,
                 measure: Callable[[], tuple[dict[int, float], bool]] | None = None) -> tuple[int, str]:
    """Slices per forward pass, and why: forced, the fastest per slice as `measure`d, or without `measure` (a
    runtime that does not measure) `default`."""
    if requested is not None:
        return requested, f"forced by {BATCH_ENV}"
    if measure is None:
        return default, "not measured for this runtime"
    ms, cached = measure()
    times = ", ".join(f"{ms[b]:.1f} at {b}" for b in sorted(ms))
    return min(ms, key=ms.get), f"measured ms per slice: {times}" + (" (cached)" if cached else "")
