"""Segment the studies of a PACS and store each result back beside its images as a DICOM SEG.

    segment_in_pacs  fetch a study's MR series, segment them with the study pipeline, store the SEG
    watch            poll for studies without our SEG of the current model version and segment each once

The model version is the fingerprint of the model as it runs (`brainmets.provenance`: checkpoints,
post-processing, TTA, lesion mode, registration setting, runtime and precision, brainmets version): after a
retune, a study is segmented again, once; with the same fingerprint, never.
Exactly once, across crashes: our SEG's SeriesInstanceUID and SOPInstanceUID are derived from the study UID
and the model version (`study_results.seg_uids`), so "is this study done?" is a question to the server (one QIDO query), and nothing
written locally can disagree with it: a run killed right after its STOW-RS finds the SEG there on restart,
and a SEG stored twice is the same instance, which the server keeps once. The local state file (written
atomically) only remembers the studies that failed, so that a study the model cannot read is not fetched
again every poll; a lock on it keeps a second watcher out.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread

from brainmets.dicomweb import AccessDenied, Pacs, PacsError, PacsUnreachable, UnusableStudy
from brainmets.inference import Predictor
from brainmets.inputs.study import study_from_datasets
from brainmets.provenance import fingerprint
from brainmets.study_results import StudyResult, segment_study


@dataclass
class Segmented:
    study_uid: str
    version: str  # the fingerprint's (`brainmets.provenance`), as the SEG's description carries it
    seg_series_uid: str
    result: StudyResult
    seconds: dict[str, float]  # fetch, segment, store


def segment_in_pacs(pacs: Pacs, predictor: Predictor, study_uid: str, tta: bool = False,
                    progress: Callable[[str], None] = lambda step: None, register: str = "auto") -> Segmented:
    """Fetch the study's MR series, segment them as one study, store the SEG beside them.

    Storing again (the same study and model version) sends the same SOP instance, which the server keeps once.
    """
    seconds, t0 = {}, time.perf_counter()
    progress("fetching")
    datasets = [ds for uid in pacs.image_series(study_uid) for ds in pacs.fetch_series(study_uid, uid)]
    seconds["fetch"], t0 = time.perf_counter() - t0, time.perf_counter()
    progress("segmenting")
    try:
        result = segment_study(predictor, study_from_datasets(datasets, name=study_uid, register=register), tta)
        seg = dcmread(io.BytesIO(result.dicom_seg()))  # UIDs derived from the study and the model version
    except ValueError as e:  # the study's fault: StudyError, ImageReadError, InputError
        raise UnusableStudy(f"study {study_uid} cannot be segmented: {e}") from None
    seconds["segment"], t0 = time.perf_counter() - t0, time.perf_counter()
    progress("storing")
    pacs.store(seg)
    seconds["store"] = time.perf_counter() - t0
    return Segmented(study_uid, result.version, seg.SeriesInstanceUID, result, seconds)


# --- watch ------------------------------------------------------------------------------------------------


class WatchState:
    """The studies that failed, per model version, in a JSON file replaced atomically (a kill -9 leaves the old
    or the new file, never half of one); held under an exclusive lock so two watchers never share it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.failed: dict[str, dict] = {}
        if self.path.exists():
            try:
                self.failed = json.loads(self.path.read_text())["failed"]
            except (ValueError, KeyError, TypeError) as e:
                raise PacsError(f"{self.path} is not a watch state file ({e}); move it away to start afresh") from None

    def failed_before(self, study_uid: str, version: str) -> bool:
        return self.failed.get(study_uid, {}).get("version") == version

    def record_failure(self, study_uid: str, version: str, error: str) -> None:
        self.failed[study_uid] = {"version": version, "error": error, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps({"failed": self.failed}, indent=1))
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


@contextmanager
def locked_state(path: Path) -> Iterator[WatchState]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_name(f".{path.name}.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the kernel even after kill -9
        except BlockingIOError:
            raise PacsError(f"another `brainmets pacs watch` is using {path}; stop it first") from None
        yield WatchState(path)


@dataclass
class WatchSummary:
    segmented: list[str] = field(default_factory=list)  # study UIDs this run stored a SEG for
    failed: list[str] = field(default_factory=list)  # studies that failed this run (kept in the state file)
    polls: int = 0


def watch(pacs: Pacs, predictor: Predictor, state_path: Path, interval_s: float = 10.0, once: bool = False,
          say: Callable[[str], None] = print, on_segmented: Callable[[Segmented], None] | None = None,
          max_polls: int | None = None, tta: bool = False, register: str = "auto") -> WatchSummary:
    """Poll the PACS and segment every study without our SEG of this model version (the predictor's fingerprint
    with `tta` and `register`), each once.

    A study is taken once its instance count is the same on two polls in a row (its series have stopped
    arriving); `once` takes what is there now, then returns. A study that fails is recorded and not retried
    with this model version; an unreachable PACS is waited for (with `once`, it ends the run).
    """
    version = fingerprint(predictor, tta, register).version
    summary, previous = WatchSummary(), {}
    with locked_state(state_path) as state:
        while max_polls is None or summary.polls < max_polls:
            summary.polls += 1
            try:
                studies = [r for r in pacs.studies() if not r.has_seg(version)]
                counts, previous = previous, {r.uid: r.instances for r in studies}
                for row in studies:
                    if state.failed_before(row.uid, version) or not (once or counts.get(row.uid) == row.instances):
                        continue
                    try:
                        done = segment_in_pacs(pacs, predictor, row.uid, tta, register=register)
                    except (PacsUnreachable, AccessDenied):
                        raise
                    except PacsError as e:
                        state.record_failure(row.uid, version, str(e))
                        summary.failed.append(row.uid)
                        say(f"failed: {e}")
                        continue
                    summary.segmented.append(row.uid)
                    if on_segmented:
                        on_segmented(done)
            except PacsUnreachable as e:
                if once:
                    raise
                say(f"{e}; trying again in {interval_s:g} s")
            if once:
                break
            time.sleep(interval_s)
    return summary
